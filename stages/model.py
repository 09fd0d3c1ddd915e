"""The `model` stage: resolve a model spec to a local folder and its fingerprint."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from sdrpn_core.models.llava import resolve_dtype
from stages.common import cache_dir
from stages.config import ModelSpec
from stages.refs import ModelRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj, model_fingerprint
from storage.store import Store


def resolve_model(spec: ModelSpec, store: Store) -> ModelRef:
    dtype = str(resolve_dtype(spec.dtype, spec.device)).removeprefix("torch.")
    if spec.source == "tiny":
        return _tiny(spec, store, dtype)
    if spec.source == "nano":
        return _nano(spec, store, dtype)
    if not spec.path:
        raise ValueError("model.path is required when model.source is 'path'")
    folder = Path(spec.path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.path))  # a hub id: the local snapshot (downloads where allowed)
    family = spec.family
    if family == "auto":
        from transformers import AutoConfig

        family = AutoConfig.from_pretrained(folder).model_type
    return _ref(folder, family, dtype, spec)


def _tiny(spec: ModelSpec, store: Store, dtype: str) -> ModelRef:
    """A seeded random tiny model (`tiny.family`: llava or qwen2_5_vl), saved once into the artifact store under its
    fingerprint."""
    from sdrpn_core.models.tiny import build_tiny

    options = dict(spec.tiny)
    family = "qwen2_5_vl" if options.pop("family", "llava") in ("qwen", "qwen2_5_vl") else "llava"
    key = hash_obj({"tiny": options, "family": family})
    local = cache_dir("models") / f"tiny-{family}-{key}"
    if not (local / "config.json").exists():
        adapter = build_tiny(family, **options)
        tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=".tiny-"))
        adapter.save_pretrained(tmp)
        try:
            tmp.rename(local)  # atomic; a concurrent builder that got there first wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    ref = _ref(local, family, dtype, spec)
    arts = ArtifactStore(store)
    if not arts.is_committed("models", ref.fingerprint):
        arts.put_dir("models", ref.fingerprint, local, meta={"source": "tiny", "family": family, "spec": key})
    return ref


def _ref(folder: Path, family: str, dtype: str, spec: ModelSpec) -> ModelRef:
    """The model's fingerprint covers its files, the adapter, the dtype and any input-setting overrides."""
    fp = model_fingerprint(folder, adapter=family, dtype=dtype)
    inputs = json.dumps(spec.inputs, sort_keys=True)
    if spec.inputs:
        fp = hash_obj({"model": fp, "inputs": spec.inputs})
    return ModelRef(fp, str(folder), family, dtype, spec.device, inputs)


SHIPPED_NANO = Path(__file__).resolve().parents[1] / "models" / "sdrpn-nano"


def _nano(spec: ModelSpec, store: Store, dtype: str) -> ModelRef:
    """The shipped sdrpn-nano, or (retrain / not shipped) one trained here from the seeded recipe, cached."""
    from sdrpn_core.synthetic.nano import NanoRecipe, train_nano

    folder = SHIPPED_NANO
    if spec.retrain or not (folder / "config.json").exists():
        recipe = NanoRecipe(**spec.nano)
        folder = cache_dir("models") / f"nano-{hash_obj({'recipe': recipe})}"
        if not (folder / "config.json").exists():
            adapter = train_nano(recipe)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".nano-"))
            adapter.model.save_pretrained(tmp)
            adapter.processor.save_pretrained(tmp)
            tmp.rename(folder)
    ref = _ref(folder, "llava", dtype, spec)
    arts = ArtifactStore(store)
    if not arts.is_committed("models", ref.fingerprint):
        arts.put_dir("models", ref.fingerprint, folder, meta={"source": "nano"})
    return ref
