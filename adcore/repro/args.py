"""The runner's arguments: the command line's, and each method's own.

:class:`ReproArgs` is what ``python -m adcore repro METHOD ...`` parsed: every flag of every
method. Before anything runs, :func:`method_args` turns it into the method's own frozen
arguments, which hold that method's flags only: :class:`VQVAEArgs` has no ``loss`` at all,
so the VQ-VAE runner cannot even receive ``--loss``; a flag the method lacks is refused with
a one-line message naming it (``--loss boundary: the vqvae method has no such setting``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from adcore.repro.presets import CFlowPreset

__all__ = ["CFlowArgs", "ReproArgs", "RunArgs", "VQVAEArgs", "command_line_args", "method_args"]


@dataclass
class ReproArgs:
    """The command line of ``repro``: every method's flags; ``None`` means "the method's default"."""

    method: str
    dataset: str
    out: Path
    root: Path | None = None
    category: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    device: str | None = None
    seed: int = 0
    loss: str = "none"
    backbone: str | None = None
    fast: bool = False
    force: bool = False
    stage_threads: int = 1
    #: cflow contrastive runs: flow loss (None: the reference code's logsigmoid), mask rule,
    #: fusion weighting (see adcore.train.contrastive)
    flow_loss: str | None = None
    mask_rule: str = "binary"
    fusion: str = "sum"
    #: cflow: the sizes that replace the standard or ``--fast`` preset (None: those); not a
    #: command-line flag, the documented override for tests and notebooks, e.g.
    #: ``dataclasses.replace(adcore.repro.presets.CFLOW_FAST, epochs=2)``
    preset: CFlowPreset | None = None


@dataclass(frozen=True)
class RunArgs:
    """The flags every method has (see :class:`ReproArgs` for their meaning)."""

    #: the method these arguments are for (a class constant)
    method: ClassVar[str] = ""
    dataset: str
    out: Path
    root: Path | None = None
    category: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    device: str | None = None
    seed: int = 0
    fast: bool = False
    force: bool = False


@dataclass(frozen=True)
class VQVAEArgs(RunArgs):
    """The VQ-VAE runner's arguments: the common flags, nothing else."""

    method: ClassVar[str] = "vqvae"


@dataclass(frozen=True)
class CFlowArgs(RunArgs):
    """The CFlow-AD runner's arguments: the common flags and CFlow-AD's own.

    Attributes:
        loss: ``none`` or a contrastive objective (:data:`adcore.losses.CONTRASTIVE_KINDS`).
        backbone: the feature extractor (None: :func:`adcore.repro.presets.choose_backbone`).
        stage_threads: feature stages trained at once on the CPU, one thread each.
        flow_loss, mask_rule, fusion: of the contrastive runs (:mod:`adcore.train.contrastive`).
        preset: sizes replacing the standard or ``--fast`` preset (tests, notebooks).
    """

    method: ClassVar[str] = "cflow"
    loss: str = "none"
    backbone: str | None = None
    stage_threads: int = 1
    flow_loss: str | None = None
    mask_rule: str = "binary"
    fusion: str = "sum"
    preset: CFlowPreset | None = None


#: each method's arguments
METHOD_ARGS: dict[str, type[RunArgs]] = {"vqvae": VQVAEArgs, "cflow": CFlowArgs}
#: the command line's value of each flag when it is left out (a method without the flag
#: accepts only this value)
_LEFT_OUT = {name: field.default for name, field in ReproArgs.__dataclass_fields__.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_args(args: ReproArgs) -> RunArgs:
    """The method's own arguments (:class:`VQVAEArgs` or :class:`CFlowArgs`) from the command line.

    Raises:
        ValueError: an unknown method, or a flag the method does not have, given a value
            (``--loss boundary: the vqvae method has no such setting (it is for cflow);
            leave the flag out``).
    """
    kind = METHOD_ARGS.get(args.method)
    if kind is None:
        raise ValueError(f"unknown method {args.method!r}; expected one of {sorted(METHOD_ARGS)}")
    own = {f.name for f in fields(kind)}
    for name in (f.name for f in fields(args)):
        value = getattr(args, name)
        if name in own or name == "method" or value is None or value == _LEFT_OUT[name]:
            continue
        # a flag of another method: accepting it would let a reader believe it acted
        owners = [m for m, other in METHOD_ARGS.items() if name in {f.name for f in fields(other)}]
        if name == "preset":
            raise ValueError(f"preset={value!r}: the {args.method} method takes no preset; "
                             "leave it out")
        raise ValueError(f"{_flag(name)} {value}: the {args.method} method has no such setting "
                         f"(it is for {', '.join(owners)}); leave the flag out")
    return kind(**{name: getattr(args, name) for name in own})


def command_line_args(args: ReproArgs | RunArgs) -> ReproArgs:
    """``args`` as the command line holds them (:class:`ReproArgs`; method arguments converted)."""
    if isinstance(args, ReproArgs):
        return args
    if not isinstance(args, RunArgs) or type(args) not in METHOD_ARGS.values():
        raise TypeError(f"expected ReproArgs, VQVAEArgs or CFlowArgs, got {type(args).__name__}")
    return ReproArgs(method=args.method, **{f.name: getattr(args, f.name) for f in fields(args)})
