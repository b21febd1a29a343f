"""``SolverSchedule``: a time grid plus one :class:`Step` strategy per step, saved as JSON.

The JSON file is versioned and validated field by field; loading it never executes code.

A plan whose steps take their weights from empirical model statistics (DPM-Solver-v3, variants
``ems`` / ``ems_pseudo``) carries them (:attr:`SolverSchedule.statistics`). Its file records them in
the top-level field ``statistics``: embedded when small (at most
:data:`~fewstep.solvers.ems.EMBED_MAX_NUMBERS` numbers, e.g. the degenerate constant statistics),
otherwise referenced by the statistics file's path (relative to the schedule file when saved with
:meth:`SolverSchedule.save`) and SHA-256, with the model key and schedule fingerprint; loading reads
and checks that file (a changed or missing file is an error). Saving a plan whose large statistics
were never saved is refused, naming :meth:`~fewstep.ModelStatistics.save`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_atomic
from ..errors import ScheduleFileError, SolverError
from ..schedules import NoiseSchedule
from .ems import ModelStatistics, StatisticsError, is_ems
from .strategy import Step

__all__ = ["SolverSchedule", "schedule_fingerprint", "schedule_identity", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fewstep.solver_schedule"
#: 2: steps carry ``noise`` / ``eta`` (version 1's ``renoise`` fraction is read as the ``renoise`` rule).
#: A plan with empirical model statistics adds the top-level field ``statistics`` (readers that do not
#: know it refuse the file as having an unknown field)
FORMAT_VERSION = 2
_TOP_FIELDS = {"format", "version", "name", "times", "steps", "schedule", "meta", "statistics"}


def _digest(cfg: dict[str, Any]) -> str:
    return f"{cfg['kind']}:" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def schedule_fingerprint(schedule: NoiseSchedule) -> str:
    """A short stable id of what defines a noise schedule's ``alpha(t)`` and ``sigma(t)``
    (:meth:`~fewstep.NoiseSchedule.definition`: its kind and defining numbers, not its name or
    time domain). Schedules are immutable, so it is computed once per schedule object."""
    cached = schedule.__dict__.get("_fingerprint")
    if cached is None:
        cached = schedule.__dict__["_fingerprint"] = _digest(schedule.definition())
    return cached


def schedule_identity(schedule: NoiseSchedule) -> str:
    """An id of the whole configuration (domain, flow shift and name included): what a preset's
    default grid depends on. Used to cache compiled presets; files record the fingerprint."""
    cached = schedule.__dict__.get("_identity")
    if cached is None:
        cached = schedule.__dict__["_identity"] = _digest(schedule.config())
    return cached


def recorded_for(recorded: str | None, schedule: NoiseSchedule) -> bool:
    """Was a file's recorded schedule id (a fingerprint, or fewstep 0.1.0's whole-config identity)
    written for ``schedule``? ``None`` (not recorded) matches any."""
    return recorded is None or recorded in (schedule_fingerprint(schedule), schedule_identity(schedule))


@dataclass(frozen=True)
class SolverSchedule:
    """A complete solver: ``times[0] > ... > times[n]`` and ``steps[i]`` taking ``times[i] -> times[i+1]``."""

    times: tuple[float, ...]
    steps: tuple[Step, ...]
    name: str = "custom"
    #: fingerprint of the noise schedule the times refer to (``None`` = not recorded)
    schedule: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    #: the empirical model statistics of steps whose weights come from them (DPM-Solver-v3), or None
    statistics: ModelStatistics | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            times = tuple(float(t) for t in self.times)
        except (TypeError, ValueError, OverflowError):
            raise SolverError(f"times must be finite numbers, got {list(self.times)[:8]!r:.200}") from None
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "steps", tuple(self.steps))
        if len(times) < 2:
            raise SolverError(f"a solver schedule needs at least 2 times, got {len(times)}")
        if len(self.steps) != len(times) - 1:
            raise SolverError(f"{len(times)} times need {len(times) - 1} steps, got {len(self.steps)}")
        if not all(math.isfinite(t) for t in times):
            raise SolverError(f"times must be finite, got {list(times)[:8]}")
        for i, (a, b) in enumerate(zip(times, times[1:])):
            if not a > b:
                raise SolverError(f"times must be strictly decreasing; times[{i}]={a} <= times[{i + 1}]={b}")
        for i, st in enumerate(self.steps):
            if not isinstance(st, Step):
                raise SolverError(f"steps[{i}] is {type(st).__name__}, expected a Step")
            if st.depth > i:
                raise SolverError(
                    f"step {i} (order {st.order}) reads {st.depth} previous steps but only {i} exist; "
                    "use a lower order on the first steps (warm-up)"
                )
            if st.correction_depth > i:
                raise SolverError(f"step {i} has an IIA correction over {st.correction_depth} differences, which reads "
                                  f"{st.correction_depth} previous steps' model outputs, but only {i} exist; shorten or drop it")
        if self.steps[-1].corrector:
            raise SolverError("the last step cannot have a corrector: no model evaluation follows it")
        if self.statistics is not None and not isinstance(self.statistics, ModelStatistics):
            raise SolverError(f"statistics must be a fewstep.ModelStatistics, got {type(self.statistics).__name__}")
        if self.statistics is None and self.uses_statistics:
            raise SolverError("steps with DPM-Solver-v3 weights ('ems' / 'ems_pseudo') need the plan's statistics: build it with "
                              "fewstep.preset('dpm_solver_v3', nfe, schedule, statistics=fewstep.model_statistics(model))")

    # ---- derived ----------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def stochastic(self) -> bool:
        """Does any step draw fresh noise (then sampling needs a seed)?"""
        return any(s.stochastic for s in self.steps)

    @property
    def nfe(self) -> int:
        """Model evaluations per sample."""
        return sum(s.nfe for s in self.steps)

    @property
    def uses_statistics(self) -> bool:
        """Do some steps take their weights from empirical model statistics (DPM-Solver-v3)?"""
        return any(is_ems(s.variant) or (s.corrector and is_ems(s.corrector_variant or s.variant)) for s in self.steps)

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Raise if this plan was made for another noise schedule, or its times fall outside it."""
        # fewstep 0.1.0 wrote the hash of the whole config (schedule_identity); still accepted
        if not recorded_for(self.schedule, schedule):
            raise SolverError(
                f"solver schedule {self.name!r} was made for noise schedule {self.schedule}, "
                f"but the model uses {schedule_fingerprint(schedule)} ({schedule!r})"
            )
        schedule.check_times(list(self.times), what=f"times of solver schedule {self.name!r}")
        st = self.statistics
        if st is not None and not recorded_for(st.schedule, schedule):
            raise SolverError(
                f"solver schedule {self.name!r} carries DPM-Solver-v3 statistics computed on noise schedule {st.schedule}, "
                f"but the model uses {schedule_fingerprint(schedule)} ({schedule!r}): compute them on this model"
            )

    def replace(self, **changes: Any) -> "SolverSchedule":
        data = {"times": self.times, "steps": self.steps, "name": self.name, "schedule": self.schedule, "meta": dict(self.meta),
                "statistics": self.statistics}
        data.update(changes)
        return SolverSchedule(**data)

    def with_step(self, i: int, step: Step) -> "SolverSchedule":
        steps = list(self.steps)
        steps[i] = step
        return self.replace(steps=tuple(steps))

    def describe(self) -> str:
        """One line per step: times and strategy."""
        lines = [f"{self.name}: {self.n_steps} steps, NFE {self.nfe}"]
        for i, st in enumerate(self.steps):
            extra = f" stages={list(st.stages)}" if st.stages else ""
            extra += f" stage_variant={st.stage_variant}" if st.stage_variant else ""
            extra += f" final_nodes={list(st.final_nodes)}" if st.final_nodes is not None else ""
            extra += f" history={list(st.history)}" if st.history else ""
            extra += " uniform_nodes" if st.uniform_nodes else ""
            extra += f" corrector={st.corrector}" if st.corrector else ""
            extra += f" corrector_variant={st.corrector_variant}" if st.corrector_variant else ""
            extra += f" noise={st.noise} eta={st.eta:g}" if st.noise != "none" else ""
            extra += f" churn={st.churn:g} churn_noise={st.churn_noise:g}" if st.churn else ""
            if st.correction is not None:
                extra += " correction=" + " ".join(f"{k}[{', '.join(f'{c:.4g}' for c in cs)}]" for k, cs in zip(("x0", "eps"), st.correction))
            lines.append(
                f"  {i:3d}: t {self.times[i]:.6g} -> {self.times[i + 1]:.6g}  {st.method} order {st.order} "
                f"{st.prediction} {st.variant}/{st.interp}{extra}"
            )
        if self.statistics is not None:
            lines.append(f"  statistics: {self.statistics!r}")
        return "\n".join(lines)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self, base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The JSON object of the file; a statistics file is referenced relative to the folder ``base``
        (default: by its absolute path)."""
        out = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "schedule": self.schedule,
            "times": list(self.times),
            "steps": [s.to_dict() for s in self.steps],
            "meta": self.meta,
        }
        if self.statistics is not None:
            try:
                out["statistics"] = self.statistics.reference(None if base is None else Path(base))
            except StatisticsError as exc:
                raise SolverError(str(exc)) from None
        return out

    def to_json(self, base: str | os.PathLike[str] | None = None) -> str:
        return json.dumps(self.to_dict(base), indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any, base: str | os.PathLike[str] | None = None) -> "SolverSchedule":
        """Parse and validate a schedule file's JSON object; a referenced statistics file is read
        relative to the folder ``base`` (default: the working directory)."""
        if not isinstance(data, dict):
            raise ScheduleFileError(f"a solver schedule must be a JSON object, got {type(data).__name__}")
        missing = {"format", "version", "times", "steps"} - set(data)
        if missing:
            raise ScheduleFileError(f"solver schedule is missing field(s) {sorted(missing)}")
        extra = set(data) - _TOP_FIELDS
        if extra:
            raise ScheduleFileError(f"solver schedule has unknown field(s) {sorted(extra)}; known: {sorted(_TOP_FIELDS)}")
        if data["format"] != FORMAT:
            raise ScheduleFileError(f"not a fewstep solver schedule: format is {data['format']!r}, expected {FORMAT!r}")
        if not isinstance(data["version"], int) or isinstance(data["version"], bool) or data["version"] > FORMAT_VERSION or data["version"] < 1:
            raise ScheduleFileError(f"unsupported solver schedule version {data['version']!r} (this fewstep reads 1..{FORMAT_VERSION})")
        times = data["times"]
        if not isinstance(times, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
            raise ScheduleFileError("'times' must be a list of numbers")
        steps = data["steps"]
        if not isinstance(steps, list):
            raise ScheduleFileError("'steps' must be a list of step objects")
        name = data.get("name", "custom")
        if not isinstance(name, str):
            raise ScheduleFileError("'name' must be a string")
        sched = data.get("schedule")
        if sched is not None and not isinstance(sched, str):
            raise ScheduleFileError("'schedule' must be a string or null")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ScheduleFileError("'meta' must be an object")
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ScheduleFileError(f"'meta' must hold plain JSON values (no NaN/Infinity): {exc}") from None
        stats = None
        if "statistics" in data:
            try:
                stats = ModelStatistics.from_reference(data["statistics"], None if base is None else Path(base))
            except StatisticsError as exc:
                raise ScheduleFileError(f"solver schedule statistics: {exc}") from None
        parsed = []
        for i, s in enumerate(steps):
            try:
                parsed.append(Step.from_dict(s))
            except (SolverError, TypeError) as exc:
                raise ScheduleFileError(f"invalid solver schedule: steps[{i}]: {exc}") from None
        try:
            return cls(times=tuple(times), steps=tuple(parsed), name=name, schedule=sched, meta=meta, statistics=stats)
        except (SolverError, TypeError) as exc:
            raise ScheduleFileError(f"invalid solver schedule: {exc}") from None

    @classmethod
    def from_json(cls, text: str, base: str | os.PathLike[str] | None = None) -> "SolverSchedule":
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ScheduleFileError:
            raise
        except ValueError as exc:  # JSONDecodeError, or an integer literal beyond Python's digit limit
            raise ScheduleFileError(f"solver schedule is not valid JSON: {exc}") from None
        return cls.from_dict(data, base)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file + rename) so an interrupted save never leaves a broken file.
        Statistics files are referenced relative to the schedule file's folder."""
        return write_atomic(path, self.to_json() if self.statistics is None else self.to_json(base=Path(path).parent))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SolverSchedule":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ScheduleFileError(f"cannot read solver schedule {str(path)!r}: {exc}") from None
        return cls.from_json(text, base=Path(path).parent)

    @classmethod
    def uniform(cls, times: Sequence[float], step: Step, *, name: str = "custom", schedule: str | None = None) -> "SolverSchedule":
        """The same strategy on every step (lower orders where the history is short)."""
        steps = []
        for i in range(len(times) - 1):
            st = step
            if step.depth > i:
                st = step.with_(order=i + 1, corrector=min(step.corrector, i + 2) if step.corrector else 0)
            if st.correction_depth > i:  # an IIA correction reads previous steps: none where there are too few
                st = st.with_(correction=None)
            steps.append(st)
        return cls(times=tuple(times), steps=tuple(steps), name=name, schedule=schedule)


def _reject_constant(value: str) -> Any:
    raise ScheduleFileError(f"solver schedule contains {value}, which is not valid JSON")
