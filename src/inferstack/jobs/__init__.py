"""Async inference: jobs queued (in-process or Redis Streams), run by workers, polled or called back.

See docs/async.md. Redis support needs ``inferstack[redis]`` and is imported
only when a Redis URL is configured.
"""

from inferstack.jobs.queue import InProcessJobQueue, JobQueue, QueueSettings
from inferstack.jobs.types import JobRecord, JobStatus

__all__ = ["InProcessJobQueue", "JobQueue", "JobRecord", "JobStatus", "QueueSettings"]
