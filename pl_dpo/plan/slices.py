"""The Cloud TPU catalogue: chips with their published figures, slices by accelerator-type name, and a slice's
devices as the TPU compiler sees them."""

from __future__ import annotations

import dataclasses

GiB = 2**30


class PlanError(ValueError):
    """Bad input to the planner: one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures (Cloud TPU system architecture pages)."""

    generation: str
    device_kind: str  # what jax reports for its devices
    hbm_bytes: float
    peak_flops: float  # bf16 dense, per chip
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # all of a chip's inter-chip links together, one direction


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1.2e12, 2400e9 / 8),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 1600e9 / 8),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 4800e9 / 8),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 3584e9 / 8),
}


def chip_of(device_kind: str) -> Chip | None:
    """The chip whose devices jax reports as `device_kind` (None: not a TPU of the catalogue)."""
    return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)


@dataclasses.dataclass(frozen=True)
class Slice:
    """A slice in Cloud TPU's accelerator-type name, e.g. v5litepod-16 (alias v5e-16) or v5p-8."""

    name: str
    chip: Chip
    num_chips: int
    topology: str  # jax.experimental.topologies' name, e.g. "v5e:4x4"
    chip_config: str  # "default", or "megacore" (v4: one device per chip, as on the VM)


def _slices() -> dict[str, Slice]:
    out: dict[str, Slice] = {}
    # v4 and v5p count TensorCores in their names (2 per chip); v5e and v6e count chips.
    cube = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4"}
    for gen, config in (("v4", "megacore"), ("v5p", "default")):
        for chips, dims in cube.items():
            name = f"{gen}-{2 * chips}"
            out[name] = Slice(name, CHIPS[gen], chips, f"{gen}:{dims}", config)
    grid = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    for gen, cloud in (("v5e", "v5litepod"), ("v6e", "v6e")):
        for chips, dims in grid.items():
            out[f"{cloud}-{chips}"] = Slice(f"{cloud}-{chips}", CHIPS[gen], chips, f"{gen}:{dims}", "default")
    return out


SLICES = _slices()
ALIASES = {f"v5e-{s.num_chips}": s.name for s in SLICES.values() if s.chip.generation == "v5e"}


def get_slice(name: str) -> Slice:
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in SLICES:
        known = ", ".join(sorted(SLICES, key=lambda n: (SLICES[n].chip.generation, SLICES[n].num_chips)))
        raise ValueError(
            f"unknown topology {name!r}; known (Cloud TPU accelerator types): {known} (v5e-N = v5litepod-N)"
        )
    return SLICES[name]


def larger_slices(s: Slice) -> list[Slice]:
    return sorted(
        (t for t in SLICES.values() if t.chip is s.chip and t.num_chips > s.num_chips), key=lambda t: t.num_chips
    )


def abstract_devices(s: Slice) -> list:
    """The slice's devices as the TPU compiler sees them (abstract: nothing to run on)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]'") from None
    from jax.experimental import topologies

    return list(
        topologies.get_topology_desc(
            platform="tpu",
            topology_name=s.topology,
            chip_config_name=s.chip_config,
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
        ).devices
    )
