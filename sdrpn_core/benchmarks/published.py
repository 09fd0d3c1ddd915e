"""The paper's published numbers (arXiv 2509.16944 v2/v3 Tables 1–2, read from the authors' repository images;
docs/method.md §8), to print beside ours when the model is one they report. Throughput is relative to the baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "llava-1.5-7b": {
        "baseline": {
            "Thru.": 1.0,
            "DocVQA": 21.5,
            "ChartQA": 18.1,
            "OCRBench": 31.4,
            "InfoVQA": 20.4,
            "TextVQA": 46.1,
            "V*": 50.3,
            "V* Attr": 48.7,
            "V* Spatial": 52.6,
            "POPE": 85.9,
            "POPE Acc": 87.4,
            "HR4K": 37.5,
            "HR8K": 33.8,
        },
        "s2": {
            "Thru.": 0.70,
            "DocVQA": 27.1,
            "ChartQA": 18.9,
            "OCRBench": 32.6,
            "InfoVQA": 22.5,
            "TextVQA": 52.6,
            "V*": 55.5,
            "POPE": 87.1,
            "HR4K": 44.0,
            "HR8K": 38.5,
        },
        "vicrop": {
            "Thru.": 0.42,
            "DocVQA": 27.0,
            "ChartQA": 20.0,
            "OCRBench": 33.2,
            "InfoVQA": 21.4,
            "TextVQA": 57.2,
            "V*": 52.4,
            "V* Attr": 53.9,
            "V* Spatial": 50.0,
            "POPE": 88.0,
            "POPE Acc": 88.6,
            "HR4K": 47.8,
            "HR8K": 36.1,
        },
        "sdrpn": {
            "Thru.": 0.62,
            "DocVQA": 33.9,
            "ChartQA": 20.1,
            "OCRBench": 37.0,
            "InfoVQA": 22.0,
            "TextVQA": 58.7,
            "V*": 67.5,
            "V* Attr": 67.8,
            "V* Spatial": 67.1,
            "POPE": 87.1,
            "POPE Acc": 87.8,
            "HR4K": 48.0,
            "HR8K": 39.1,
        },
    },
    "llava-1.5-13b": {
        "baseline": {
            "Thru.": 1.0,
            "DocVQA": 23.5,
            "ChartQA": 18.1,
            "OCRBench": 33.7,
            "InfoVQA": 23.4,
            "TextVQA": 48.7,
            "V*": 50.8,
            "POPE": 85.9,
            "HR4K": 43.0,
            "HR8K": 36.6,
        },
        "vicrop": {
            "Thru.": 0.39,
            "DocVQA": 30.2,
            "ChartQA": 20.1,
            "OCRBench": 36.1,
            "InfoVQA": 25.9,
            "TextVQA": 60.3,
            "V*": 51.8,
            "POPE": 88.0,
            "HR4K": 53.3,
            "HR8K": 40.6,
        },
        "sdrpn": {
            "Thru.": 0.51,
            "DocVQA": 39.7,
            "ChartQA": 21.4,
            "OCRBench": 38.8,
            "InfoVQA": 24.7,
            "TextVQA": 62.3,
            "V*": 62.3,
            "POPE": 87.3,
            "HR4K": 52.8,
            "HR8K": 43.6,
        },
    },
    "qwen2.5-vl-3b": {
        "baseline": {
            "Thru.": 1.0,
            "DocVQA": 87.1,
            "ChartQA": 82.6,
            "OCRBench": 73.8,
            "InfoVQA": 62.7,
            "TextVQA": 76.9,
            "V*": 73.3,
            "POPE": 87.8,
            "HR4K": 66.3,
            "HR8K": 58.9,
        },
        "sdrpn": {
            "Thru.": 0.56,
            "DocVQA": 89.5,
            "ChartQA": 83.8,
            "OCRBench": 76.3,
            "InfoVQA": 67.0,
            "TextVQA": 79.7,
            "V*": 81.2,
            "POPE": 88.9,
            "HR4K": 73.1,
            "HR8K": 65.3,
        },
    },
    "qwen2.5-vl-7b": {
        "baseline": {
            "Thru.": 1.0,
            "DocVQA": 92.0,
            "ChartQA": 82.6,
            "OCRBench": 81.5,
            "InfoVQA": 70.2,
            "TextVQA": 81.1,
            "V*": 78.0,
            "POPE": 86.7,
            "HR4K": 72.5,
            "HR8K": 63.6,
        },
        "sdrpn": {
            "Thru.": 0.57,
            "DocVQA": 93.6,
            "ChartQA": 85.5,
            "OCRBench": 82.9,
            "InfoVQA": 76.9,
            "TextVQA": 83.5,
            "V*": 89.5,
            "POPE": 88.4,
            "HR4K": 78.5,
            "HR8K": 73.5,
        },
    },
}

TOKEN_PIXELS = 28 * 28  # Qwen2.5-VL: one image token per merged 28×28 patch
QWEN_576 = (576 * TOKEN_PIXELS, 576 * TOKEN_PIXELS)  # min = max = 451,584: every Qwen script's default


@dataclass(frozen=True)
class PaperProtocol:
    """How the authors measured one model's paper rows (their scripts; docs/evaluation-protocol.md), which is what
    `protocol: paper` in a config sets: the teacher's and the evaluation's precision, training's, pass 2 recomputed,
    and the image pixel range (min, max) of each paper column (`columns`, the high-resolution tables), else `pixels`
    (Qwen's 576 tokens; None: LLaVA's fixed 336 px square, 576 tokens)."""

    dtype: str
    train_dtype: str = "bfloat16"
    kv_reuse: bool = False
    pixels: tuple[int, int] | None = None
    columns: dict[str, tuple[int, int]] = field(default_factory=dict)

    def pixels_of(self, column: str) -> tuple[int, int] | None:
        return self.columns.get(column, self.pixels)

    def tokens_of(self, column: str) -> str:
        """The image tokens of a column as the paper states them: "576", or a range "1,024–4,096"."""
        return tokens_stated(self.pixels_of(column) or (576 * TOKEN_PIXELS,) * 2)


def tokens_stated(pixels: tuple[int, int]) -> str:
    """A (min, max) pixel range as image tokens, the way the paper states them: "576", or "1,024–4,096"."""
    low, high = (t // TOKEN_PIXELS for t in pixels)
    return f"{high:,}" if low == high else f"{low:,}–{high:,}"


# A cell whose protocol differs from the run beside it is marked in the report. Qwen's high-resolution columns are
# the authors' `vstar_bench` / `hrbench` runs (7B: V* 576–3,072 tokens, HR-Bench 576–4,096; 3B: 1,024–4,096 both).
PAPER_PROTOCOL: dict[str, PaperProtocol] = {
    "llava-1.5-7b": PaperProtocol("float16"),
    "llava-1.5-13b": PaperProtocol("float16"),
    "qwen2.5-vl-3b": PaperProtocol(
        "bfloat16",
        pixels=QWEN_576,
        columns={c: (1024 * TOKEN_PIXELS, 4096 * TOKEN_PIXELS) for c in ("V*", "HR4K", "HR8K")},
    ),
    "qwen2.5-vl-7b": PaperProtocol(
        "bfloat16",
        pixels=QWEN_576,
        columns={
            "V*": (576 * TOKEN_PIXELS, 3072 * TOKEN_PIXELS),
            **{c: (576 * TOKEN_PIXELS, 4096 * TOKEN_PIXELS) for c in ("HR4K", "HR8K")},
        },
    ),
}


def paper_protocol(model: str, column: str) -> dict:
    """The protocol of one paper cell: image tokens (as stated) and pixel range, dtype, KV reuse (None: unknown)."""
    p = PAPER_PROTOCOL.get(model)
    if p is None:
        return {"tokens": None, "pixels": None, "dtype": None, "kv_reuse": None}
    return {"tokens": p.tokens_of(column), "pixels": p.pixels_of(column), "dtype": p.dtype, "kv_reuse": p.kv_reuse}
