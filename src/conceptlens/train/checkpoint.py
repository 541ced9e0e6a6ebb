"""Resumable training state in safetensors (weights, EMA, optimizer moments) + JSON metadata: no pickle.

Every step's randomness is derived from (seed, step), so weights + optimizer state + step count are the
whole state: resuming gives bit-identical results to an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ConceptlensError
from ..io import read_safetensors_meta, save_safetensors


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{name}"] = val.detach().cpu().clone().contiguous()
            else:
                scalars[f"{idx}.{name}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    for key, val in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                    meta: dict) -> None:
    """Write modules' weights (prefixed by their name), optimizer moments and `meta` atomically."""
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous().clone() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    full_meta = dict(meta)
    if optimizer is not None:
        opt_tensors, full_meta["optimizer"] = _flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
    save_safetensors(Path(path), tensors, full_meta)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights into `modules` (and the optimizer) from `save_checkpoint`'s file; returns its metadata."""
    meta = read_safetensors_meta(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            head, _, rest = key.partition(".")
            groups.setdefault(head, {})[rest] = f.get_tensor(key)
    for name, m in modules.items():
        if name not in groups:
            raise ConceptlensError(f"{path} has no weights for {name!r}")
        m.load_state_dict(groups[name])
    if optimizer is not None and "optimizer" in meta:
        optimizer.load_state_dict(_unflatten_optimizer(groups.get("optim", {}), meta["optimizer"]))
    return meta
