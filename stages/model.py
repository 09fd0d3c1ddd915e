"""The `model` stage: resolve a model spec to a local folder and its fingerprint."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from sdrpn_core.models.llava import resolve_dtype
from stages.common import Stage, cache_dir
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
    from sdrpn_core.models.tiny import build_tiny, tiny_family

    options = dict(spec.tiny)
    family = tiny_family(options.pop("family", "llava"))
    key = hash_obj({"tiny": options, "family": family})
    local = cache_dir("models") / f"tiny-{family}-{key}"
    if not (local / "config.json").exists():
        _fill_atomically(local, build_tiny(family, **options).save_pretrained)
    ref = _ref(local, family, dtype, spec)
    arts = ArtifactStore(store)
    if not arts.is_committed("models", ref.fingerprint):
        arts.put_dir("models", ref.fingerprint, local, meta={"source": "tiny", "family": family, "spec": key})
    return ref


def _fill_atomically(folder: Path, fill) -> None:
    """Write a folder through a hidden sibling renamed into place: readers never see it half-written, and a
    concurrent writer that got there first wins."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        fill(tmp)
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise  # a real failure, not a concurrent writer that got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ref(folder: Path, family: str, dtype: str, spec: ModelSpec) -> ModelRef:
    """The model's fingerprint covers its files, the adapter, the dtype and any input-setting overrides."""
    fp = model_fingerprint(folder, adapter=family, dtype=dtype)
    inputs = json.dumps(spec.inputs, sort_keys=True)
    if spec.inputs:
        fp = hash_obj({"model": fp, "inputs": spec.inputs})
    return ModelRef(fp, str(folder), family, dtype, spec.device, inputs)


SHIPPED_NANO = Path(__file__).resolve().parents[1] / "models" / "sdrpn-nano"


def nano_base_fingerprint(overrides: dict) -> str:
    """The recipe (defaults + `model.nano` overrides) and the sources it trains with: the synthetic task and the
    trainer. Unlike the other stages, edits elsewhere in `sdrpn_core` do not retrain it (it takes the better part
    of an hour on a CPU)."""
    return NANO_BASE.fingerprint(overrides=overrides)


def nano_base_key(overrides: dict) -> dict:
    from sdrpn_core.synthetic.nano import NanoRecipe

    return {"recipe": NanoRecipe(**overrides)}


def nano_base_lookup(store: Store, fp: str) -> str | None:
    """`fp` when the trained base model is committed and every file matches its marker, else None."""
    return fp if ArtifactStore(store).verify("nano_base", fp) is not None else None


def nano_base(overrides: dict, store: Store, fp: str, progress=None) -> str:
    """The `nano_base` stage: train sdrpn-nano from scratch with the seeded recipe and commit it to the artifact
    store (`nano_base/<fp>`); a committed one is not trained again. Returns `fp`."""
    from sdrpn_core.synthetic.nano import NanoRecipe, train_nano

    recipe = NanoRecipe(**overrides)
    adapter = train_nano(recipe, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save_pretrained(tmp)
        ArtifactStore(store).put_dir("nano_base", fp, tmp, meta={"recipe": hash_obj({"recipe": recipe})})
    return fp


def _nano(spec: ModelSpec, store: Store, dtype: str) -> ModelRef:
    """The shipped sdrpn-nano, or (retrain / not shipped) the `nano_base` stage's model, fetched from the store."""
    folder = SHIPPED_NANO
    if spec.retrain or not (folder / "config.json").exists():
        fp = NANO_BASE.ensure(overrides=spec.nano, store=store)
        folder = cache_dir("models") / f"nano-{fp}"
        if not (folder / "config.json").exists():
            _fill_atomically(folder, lambda tmp: ArtifactStore(store).fetch_dir("nano_base", fp, tmp))
    ref = _ref(folder, "llava", dtype, spec)
    arts = ArtifactStore(store)
    if not arts.is_committed("models", ref.fingerprint):
        arts.put_dir("models", ref.fingerprint, folder, meta={"source": "nano"})
    return ref


MODEL = Stage("model", run=resolve_model)
NANO_BASE = Stage(
    "nano_base",
    run=nano_base,
    lookup=nano_base_lookup,
    run_name="nano-base",
    progress="training sdrpn-nano from scratch",
    model_bound=True,
    retries=False,
    # the recipe and the synthetic task: edits to the adapters or the inference code do not retrain the base
    code=("sdrpn_core.synthetic", "sdrpn_core.synthetic.nano"),
    exclude=("sdrpn_core.models", "sdrpn_core.infer", "sdrpn_core.metrics", "sdrpn_core.progress"),
    key=nano_base_key,
)
