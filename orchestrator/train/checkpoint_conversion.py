"""Converting a DeepSpeed checkpoint for a run at another worker count or ZeRO stage.

A ZeRO checkpoint holds one optimiser partition per rank, which DeepSpeed's `load_checkpoint`
reads only at the worker count and stage that wrote it. DeepSpeed's universal checkpoint (one
file per parameter and optimiser moment, nothing partitioned) is the pivot between layouts:

    ZeRO 1-3 checkpoint --ds_to_universal--------> universal folder --load_universal--> ZeRO 1-3 engine
    stage-0 checkpoint  --_universal_from_stage_0-^        |
                                                           +--_stage_0_from_universal-> stage-0 engine

The conversion is DeepSpeed's (`deepspeed.checkpoint.ds_to_universal`) and so is the
partitioning on load (`"checkpoint": {"load_universal": true}`); this module only moves files
between the formats DeepSpeed writes and reads, which in DeepSpeed 0.19.8 differ by stage
(measured, each one a failed load before `_normalise`):
- ZeRO-3's converter writes flat tensors and no `step.pt`; the ZeRO-1/2 loader wants
  `{"param": tensor}` in the parameter's shape and reads the Adam step from `step.pt`;
- ZeRO-1/2's global optimiser state lacks `optimizer_state_dict`, where the ZeRO-3 loader
  reads the step; the ZeRO-1/2 loader asserts a `ds_version`;
- a ZeRO-3 engine reads the lr schedule and client state from
  `zero_pp_rank_0_mp_rank_00_model_states.pt`, a ZeRO-1/2 engine from `mp_rank_00_model_states.pt`.
`_normalise` writes the union, so one universal folder loads at any ZeRO stage and worker count.
No engine loads a universal folder without ZeRO, so for stage 0 the folder is consolidated into an
ordinary stage-0 checkpoint (the module's state dict and torch's optimiser state dict, which
hold whole tensors and load at any worker count).

Every tensor is read and written one parameter at a time, so the host memory a conversion needs
is about one parameter's state, except for stage 0, whose checkpoint holds the whole optimiser
state in one file (as stage 0 does in training).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch

from orchestrator.errors import CheckpointError

# the files of a DeepSpeed checkpoint (under its tag folder) that this module reads or writes
ZERO_1_2_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO_3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_MOMENTS = ("fp32", "exp_avg", "exp_avg_sq")  # an Adam-family optimiser's state, as DeepSpeed names it


def loads_universal(zero_stage: int) -> bool:
    """Whether an engine at `zero_stage` loads a converted checkpoint as a universal one (set
    `"checkpoint": {"load_universal": true}` when it is built) or as an ordinary stage-0 one."""
    return zero_stage > 0


@contextlib.contextmanager
def converted_checkpoint(folder: str, tag: str, *, saved_stage: int, zero_stage: int, parameters: dict[str, tuple[int, ...]]) -> Iterator[str]:
    """A temporary folder holding the DeepSpeed checkpoint `folder/tag`, written at ZeRO stage
    `saved_stage` by any number of workers, converted for an engine at `zero_stage` with any
    number of workers (see `loads_universal` for how that engine loads it). `parameters`: the
    trained parameters' names and full shapes, in the order the optimiser holds them."""
    with tempfile.TemporaryDirectory(prefix="ucgm-converted-") as work:
        universal = os.path.join(work, "universal", tag)
        source = os.path.join(folder, tag)
        if saved_stage == 0:
            _universal_from_stage_0(source, universal, parameters)
        else:
            _ds_to_universal(source, universal)
        _normalise(universal, parameters)
        if loads_universal(zero_stage):
            yield os.path.dirname(universal)
            return
        stage_0 = os.path.join(work, "stage0", tag)
        _stage_0_from_universal(universal, stage_0, parameters)
        shutil.rmtree(universal)
        yield os.path.dirname(stage_0)


def _ds_to_universal(source: str, universal: str) -> None:
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(
        argparse.Namespace(
            input_folder=source,
            output_folder=universal,
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # the state Megatron-style clients save for the converter; ours holds no tensor parallelism
            inject_missing_state=True,
        )
    )


def _universal_from_stage_0(source: str, universal: str, parameters: dict[str, tuple[int, ...]]) -> None:
    """Write the universal folder of a stage-0 checkpoint: its module holds the whole weights and
    its torch optimiser state dict the whole moments, by position in `parameters`."""
    import deepspeed

    states = _load(os.path.join(source, ZERO_1_2_MODEL_STATES))
    optimizer = states["optimizer"]
    moments = optimizer["state"]
    step = _common_step([moments[i]["step"] for i in moments])
    for index, name in enumerate(parameters):
        weights = states["module"][name].float()
        saved = moments.get(index, {})  # a parameter that never had a gradient has no state yet
        tensors = {
            "fp32": weights,
            "exp_avg": saved.get("exp_avg", torch.zeros_like(weights)),
            "exp_avg_sq": saved.get("exp_avg_sq", torch.zeros_like(weights)),
        }
        for key, tensor in tensors.items():
            _save({"param": tensor}, _parameter_folder(universal, name), f"{key}.pt")
        _save(step, _parameter_folder(universal, name), "step.pt")
    _save(
        {"ds_version": deepspeed.__version__, "param_groups": optimizer["param_groups"]},
        os.path.join(universal, "zero"),
        "optimizer_state.pt",
    )
    states["optimizer"] = None  # the universal folder holds it now; the file keeps the lr schedule and client state
    _save(states, universal, ZERO_1_2_MODEL_STATES)


def _normalise(universal: str, parameters: dict[str, tuple[int, ...]]) -> None:
    """Rewrite a universal folder into the union of what DeepSpeed's ZeRO-1/2 and ZeRO-3
    loaders read (see the module docstring)."""
    import deepspeed

    zero = os.path.join(universal, "zero")
    global_state = _load(os.path.join(zero, "optimizer_state.pt"))
    step = _universal_step(universal, parameters, global_state)
    for name, shape in parameters.items():
        folder = _parameter_folder(universal, name)
        if not os.path.isdir(folder):
            raise CheckpointError(
                f"the checkpoint holds no optimiser state for parameter {name!r}, so it cannot be converted for another worker "
                "count or ZeRO stage; resume it with the distributed.num_workers and distributed.zero_stage that wrote it"
            )
        for key in _MOMENTS:
            saved = _load(os.path.join(folder, f"{key}.pt"))
            tensor = saved["param"] if isinstance(saved, dict) else saved
            _save({**(saved if isinstance(saved, dict) else {}), "param": tensor.reshape(shape)}, folder, f"{key}.pt")
        if not os.path.exists(os.path.join(folder, "step.pt")):
            _save(step, folder, "step.pt")
    global_state.setdefault("ds_version", deepspeed.__version__)
    global_state.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": global_state["param_groups"]})
    global_state.pop("fp32_flat_groups", None)  # ZeRO-3 rank 0's own partition: not read, and as large as its share
    _save(global_state, zero, "optimizer_state.pt")
    model_states = _model_states_file(universal)
    for name in (ZERO_1_2_MODEL_STATES, ZERO_3_MODEL_STATES):
        if not os.path.exists(os.path.join(universal, name)):
            shutil.copyfile(model_states, os.path.join(universal, name))


def _stage_0_from_universal(universal: str, stage_0: str, parameters: dict[str, tuple[int, ...]]) -> None:
    """Write an ordinary stage-0 checkpoint from a (normalised) universal folder: the module's
    state dict and the torch optimiser's, with the universal folder's lr schedule and client state."""
    zero = os.path.join(universal, "zero")
    states = _load(_model_states_file(universal))
    module = {name: value for name, value in (states.get("module") or {}).items() if name not in parameters}  # buffers
    moments: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(parameters):
        folder = _parameter_folder(universal, name)
        module[name] = _load(os.path.join(folder, "fp32.pt"))["param"]
        moments[index] = {
            "step": torch.tensor(float(_load(os.path.join(folder, "step.pt")))),
            "exp_avg": _load(os.path.join(folder, "exp_avg.pt"))["param"],
            "exp_avg_sq": _load(os.path.join(folder, "exp_avg_sq.pt"))["param"],
        }
    groups = _load(os.path.join(zero, "optimizer_state.pt"))["param_groups"]
    if len(groups) != 1:
        raise CheckpointError(f"the checkpoint's optimiser has {len(groups)} parameter groups; converting it for stage 0 supports one")
    group = {key: value for key, value in groups[0].items() if key != "params"}
    states["module"] = module
    states["optimizer"] = {"state": moments, "param_groups": [{**group, "params": list(range(len(parameters)))}]}
    _save(states, stage_0, ZERO_1_2_MODEL_STATES)


# --------------------------------------------------------------------------- helpers


def _universal_step(universal: str, parameters: dict[str, tuple[int, ...]], global_state: dict[str, Any]) -> Any:
    """The optimiser's step count, from a parameter's `step.pt` (ZeRO 1/2, stage 0) or the global
    state (ZeRO-3)."""
    for name in parameters:
        path = os.path.join(_parameter_folder(universal, name), "step.pt")
        if os.path.exists(path):
            return _load(path)
    return global_state["optimizer_state_dict"]["state"][0]["step"]


def _common_step(steps: list[Any]) -> Any:
    values = {float(step) for step in steps}
    if len(values) > 1:
        raise CheckpointError(f"the checkpoint's parameters were stepped unequally ({sorted(values)}); it cannot be converted")
    return steps[0] if steps else 0


def _model_states_file(universal: str) -> str:
    for name in (ZERO_1_2_MODEL_STATES, ZERO_3_MODEL_STATES):
        if os.path.exists(os.path.join(universal, name)):
            return os.path.join(universal, name)
    found = sorted(glob.glob(os.path.join(universal, "*model_states.pt")))
    if not found:
        raise CheckpointError(f"the DeepSpeed checkpoint {universal} holds no model states file")
    return found[0]


def _parameter_folder(universal: str, name: str) -> str:
    return os.path.join(universal, "zero", name)


def _load(path: str) -> Any:
    # DeepSpeed's own files (argparse namespaces, version objects): not loadable with weights_only
    return torch.load(path, map_location="cpu", weights_only=False)


def _save(value: Any, folder: str, name: str) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(value, os.path.join(folder, name))
