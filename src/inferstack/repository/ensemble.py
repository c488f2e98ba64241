"""The structure of an ensemble config (``platform: "ensemble"``), checked from the config alone.

An ensemble is a data-flow graph: its tensors are the ensemble's inputs and
every step's outputs, and each step consumes some of them. Everything that can
be said without looking at the step models is checked here, when the config
is validated: each tensor has exactly one producer, every step input and every
ensemble output is produced by something, and the steps form no cycle. What
needs the step models (their inputs, outputs, datatypes, shapes, batch sizes)
is checked by ``serving.ensemble`` once they are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferstack._proto import model_config_pb2 as mc


class EnsembleConfigError(Exception):
    """An ensemble whose graph cannot run; the message names the step and tensor."""


@dataclass(frozen=True, slots=True)
class EnsembleStep:
    """One step: which model runs, and how its tensors map to the ensemble's."""

    index: int
    model_name: str
    #: A version number, or -1 (or 0, proto3's default) for the latest ready version.
    model_version: int
    #: step model input name -> ensemble tensor name
    input_map: dict[str, str]
    #: step model output name -> ensemble tensor name
    output_map: dict[str, str]

    @property
    def version_str(self) -> str:
        """The version as a lookup takes it ("" is the latest ready one)."""
        return str(self.model_version) if self.model_version > 0 else ""

    @property
    def label(self) -> str:
        """How errors name the step: ``step 1 (model 'classifier')``."""
        return f"step {self.index} (model {self.model_name!r})"


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == "ensemble" or config.HasField("ensemble_scheduling")


def ensemble_steps(config: mc.ModelConfig) -> list[EnsembleStep]:
    return [
        EnsembleStep(
            index=index,
            model_name=step.model_name,
            model_version=step.model_version,
            # Sorted: protobuf maps have no order, and errors must name the same tensor every time.
            input_map=dict(sorted(step.input_map.items())),
            output_map=dict(sorted(step.output_map.items())),
        )
        for index, step in enumerate(config.ensemble_scheduling.step)
    ]


def check_ensemble(config: mc.ModelConfig) -> list[str]:
    """Check an ensemble's graph; raise EnsembleConfigError, or return warnings."""
    if config.platform != "ensemble":
        raise EnsembleConfigError(
            f"ensemble_scheduling needs platform: \"ensemble\" (got platform {config.platform!r}"
            f"{f', backend {config.backend!r}' if config.backend else ''})"
        )
    if config.backend:
        raise EnsembleConfigError(f"an ensemble has no backend, got backend {config.backend!r}")
    steps = ensemble_steps(config)
    if not steps:
        raise EnsembleConfigError("platform \"ensemble\" needs ensemble_scheduling with at least one step")
    if not config.input or not config.output:
        raise EnsembleConfigError("an ensemble must declare its inputs and outputs (they are not auto-completed)")
    warnings: list[str] = []
    for field_name in ("dynamic_batching", "sequence_batching"):
        if config.HasField(field_name):
            warnings.append(f"{field_name} ignored for an ensemble: each step model batches in its own scheduler")
    if config.instance_group:
        warnings.append("instance_group ignored for an ensemble: it has no instances, its step models do")

    # Who produces each tensor: None for an ensemble input, else the step.
    producer: dict[str, EnsembleStep | None] = {tensor.name: None for tensor in config.input}
    for step in steps:
        if not step.model_name:
            raise EnsembleConfigError(f"step {step.index} has no model_name")
        if step.model_name == config.name:
            raise EnsembleConfigError(f"{step.label}: an ensemble cannot be a step of itself (a cycle)")
        if not step.output_map:
            raise EnsembleConfigError(f"{step.label} has an empty output_map; it would produce nothing")
        for model_output, tensor in step.output_map.items():
            if not tensor:
                raise EnsembleConfigError(f"{step.label}: output {model_output!r} is mapped to an empty tensor name")
            if tensor in producer:
                other = producer[tensor]
                first = "it is an ensemble input" if other is None else f"{other.label} produces it too"
                raise EnsembleConfigError(
                    f"{step.label}: output {model_output!r} is mapped to tensor {tensor!r}, but {first}; "
                    "every ensemble tensor needs exactly one producer"
                )
            producer[tensor] = step
        if len(set(step.output_map.values())) != len(step.output_map):
            raise EnsembleConfigError(f"{step.label}: two outputs are mapped to the same tensor")
    consumed: set[str] = set()
    for step in steps:
        for model_input, tensor in step.input_map.items():
            if tensor not in producer:
                raise EnsembleConfigError(
                    f"{step.label}: input {model_input!r} is mapped from tensor {tensor!r}, which is neither an "
                    "ensemble input nor the output of any step"
                )
            consumed.add(tensor)
    for tensor in config.output:
        if tensor.name not in producer:
            raise EnsembleConfigError(f"ensemble output {tensor.name!r} is not produced by any step's output_map")
        if producer[tensor.name] is None:
            raise EnsembleConfigError(
                f"ensemble output {tensor.name!r} is also an ensemble input; an output must come from a step"
            )
    unused = [tensor.name for tensor in config.input if tensor.name not in consumed]
    if unused:
        warnings.append(f"ensemble inputs {unused} are not used by any step")
    topological_order(steps, producer)
    return warnings


def topological_order(
    steps: list[EnsembleStep], producer: dict[str, EnsembleStep | None] | None = None
) -> list[EnsembleStep]:
    """The steps in an order where every step comes after the steps it consumes from.

    Raises EnsembleConfigError naming the steps of a cycle.
    """
    if producer is None:
        producer = {tensor: step for step in steps for tensor in step.output_map.values()}
    depends: dict[int, set[int]] = {}
    for step in steps:
        depends[step.index] = {
            source.index for tensor in step.input_map.values() if (source := producer.get(tensor)) is not None
        }
    by_index = {step.index: step for step in steps}
    order: list[EnsembleStep] = []
    done: set[int] = set()
    remaining = dict(depends)
    while remaining:
        ready = [index for index, needs in remaining.items() if needs <= done]
        if not ready:
            cycle = _find_cycle(remaining)
            path = " -> ".join(by_index[i].label for i in cycle)
            raise EnsembleConfigError(f"the steps form a cycle: {path}")
        for index in sorted(ready):
            order.append(by_index[index])
            done.add(index)
            del remaining[index]
    return order


def _find_cycle(remaining: dict[int, set[int]]) -> list[int]:
    """One cycle among steps that all still wait on something (there always is one)."""
    start = min(remaining)
    path: list[int] = []
    seen: dict[int, int] = {}
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(n for n in remaining[node] if n in remaining)
    cycle = path[seen[node]:]
    return [*cycle, cycle[0]]
