"""The model and dataset hubs: ModelScope by default, Hugging Face with USE_HF=1 (as ms-swift does).

Every command asks here which hub to use and goes through here to download, so `USE_HF` means the
same thing for models, datasets and benchmarks. The hub packages are optional (`zhtune[hub]`); without
them, or offline, the error says how to work from local files instead.
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from zhtune.env import env_switch
from zhtune.errors import UserError
from zhtune.files import one_line

def use_hf() -> bool:
    """USE_HF=1/true/yes/on (any case) selects Hugging Face; anything else, or unset, ModelScope."""
    return env_switch("USE_HF", False)


def hub_name(hf: bool | None = None) -> str:
    return "Hugging Face" if (use_hf() if hf is None else hf) else "ModelScope"


def offline() -> bool:
    return any(env_switch(v, False) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ZHTUNE_OFFLINE"))


def download_model(hub_id: str, revision: str | None = None) -> Path:
    """A local folder with the model's files (the hub's own cache is reused)."""
    hf = use_hf()
    advice = ("download the model elsewhere and pass its folder: --model_id_or_path /path/to/folder "
              "--model_type T")
    try:
        if hf:
            from huggingface_hub import snapshot_download
        else:
            from modelscope import snapshot_download
    except ImportError as e:
        pkg = "huggingface_hub" if hf else "modelscope"
        raise UserError(f"downloading '{hub_id}' needs the package {pkg}: `pip install 'zhtune[hub]'`; or "
                        f"{advice}.") from e
    try:
        return Path(snapshot_download(hub_id, revision=revision))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise UserError(f"cannot download '{hub_id}' from {hub_name(hf)} ({type(e).__name__}). Without "
                        f"network, {advice}.") from e


def load_dataset_rows(hub_id: str, subset: str | None, split: str, *, hf: bool | None = None,
                      advice: str) -> list[dict]:
    """All rows of one subset and split of a hub dataset (Hugging Face `datasets` or ModelScope's
    MsDataset). `advice` finishes every error: what to do without the hub."""
    hf = use_hf() if hf is None else hf
    label = f"{hub_id}:{subset}" if subset and subset != "default" else hub_id
    if offline() and hf:
        raise UserError(f"dataset {label}: the hub is switched off (HF_HUB_OFFLINE); {advice}")
    if not reachable(hf):
        raise UserError(f"dataset {label}: {hub_name(hf)} is not reachable; {advice}")
    try:
        if hf:
            from datasets import load_dataset
        else:
            from modelscope import MsDataset
    except ImportError as e:
        pkg = "datasets (pip install 'zhtune[data]')" if hf else "modelscope (pip install 'zhtune[hub]')"
        raise UserError(f"dataset {label}: loading from {hub_name(hf)} needs the package {pkg}; {advice}") from e
    try:
        if hf:
            data = load_dataset(hub_id, None if subset in (None, "default") else subset, split=split)
        else:
            data = MsDataset.load(hub_id, subset_name=subset or "default", split=split)
        return [dict(row) for row in data]
    except Exception as e:  # noqa: BLE001 - offline, missing id, hub down: all need the same advice
        raise UserError(f"dataset {label}: could not load it from {hub_name(hf)} ({type(e).__name__}: {one_line(e)}); "
                        f"{advice}") from e


def hub_host(hf: bool | None = None) -> str:
    if use_hf() if hf is None else hf:
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    return os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn").split("://")[-1].split("/")[0]


def reachable(hf: bool | None = None, timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine gets its error in seconds, not after the client's retries."""
    try:
        socket.create_connection((hub_host(hf), 443), timeout=timeout).close()
        return True
    except OSError:
        return False
