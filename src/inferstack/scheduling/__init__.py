"""Per-model scheduling: the dynamic batcher, queue policies, instance dispatch."""

from inferstack.scheduling.batcher import QueuePolicy, Scheduler, SchedulerConfig

__all__ = ["QueuePolicy", "Scheduler", "SchedulerConfig"]
