from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrpn_core import teacher as teacher_mod
from sdrpn_core.data import Sample
from sdrpn_core.models import AdapterError
from sdrpn_core.presets import PRESETS, get_preset
from sdrpn_core.teacher import extract_teacher_maps, reference_maps_output_attentions
from tests.conftest import QUESTIONS, random_image

MAX_NEW = 7


@pytest.fixture(scope="module")
def early_eos(tiny_vlm, tiny_preset):
    """A token that row 0 greedily emits at step 2 but others do not emit early: ragged answer lengths in a batch."""
    images = [random_image(i, (24 + 9 * i, 40 - 5 * i)) for i in range(4)]
    x = tiny_vlm.build_inputs(images, QUESTIONS)
    with torch.no_grad():
        out = tiny_vlm.model.generate(**x.model_kwargs(), max_new_tokens=MAX_NEW, do_sample=False)
    gen = out[:, x.input_ids.shape[1] :]
    for tok in gen[0, 1:4].tolist():
        if not (gen[1:, :3] == tok).any():
            return tok
    return int(gen[0, 2])


def samples_for(images):
    return [Sample(f"s{i}", im, q) for i, (im, q) in enumerate(zip(images, QUESTIONS, strict=False))]


def test_maps_equal_output_attentions_reference(tiny_vlm, tiny_preset, images, early_eos, monkeypatch):
    kw = {"eos_token_id": early_eos}
    # both decode greedily even where the model's own generation config samples
    monkeypatch.setattr(tiny_vlm.model.generation_config, "do_sample", True)
    out = extract_teacher_maps(
        tiny_vlm, samples_for(images), tiny_preset, batch_size=4, max_new_tokens=MAX_NEW, generation_kwargs=kw
    )
    assert not out.rejected
    x = tiny_vlm.build_inputs(images, QUESTIONS)
    ref_g, ref_s, gen = reference_maps_output_attentions(tiny_vlm, x, tiny_preset, MAX_NEW, **kw)
    steps = [r.n_steps for r in out.records]
    assert len(set(steps)) > 1, "test needs ragged answer lengths"
    for i, rec in enumerate(out.records):
        np.testing.assert_allclose(rec.grounding, ref_g[i].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rec.sink, ref_s[i].numpy(), rtol=1e-5, atol=1e-7)
        assert rec.grounding.shape == (tiny_vlm.num_image_tokens,) and rec.grid == tiny_vlm.grid
        assert rec.grounding.sum() > 0
        tokens = gen[i, : rec.n_steps + 1]
        assert rec.answer == tiny_vlm.decode(tokens[tokens != early_eos])


def test_batched_equals_batch_of_one(tiny_vlm, tiny_preset, images, early_eos):
    kw = {"eos_token_id": early_eos}
    batched = extract_teacher_maps(
        tiny_vlm, samples_for(images), tiny_preset, batch_size=4, max_new_tokens=MAX_NEW, generation_kwargs=kw
    )
    single = extract_teacher_maps(
        tiny_vlm, samples_for(images), tiny_preset, batch_size=1, max_new_tokens=MAX_NEW, generation_kwargs=kw
    )
    assert [r.sample_id for r in batched.records] == [r.sample_id for r in single.records]
    for a, b in zip(batched.records, single.records, strict=True):
        assert a.answer == b.answer and a.n_steps == b.n_steps
        np.testing.assert_allclose(a.grounding, b.grounding, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.sink, b.sink, rtol=1e-4, atol=1e-6)


def test_steps_are_every_generated_token_but_the_last(tiny_vlm, tiny_preset, images):
    # With no EOS in reach, MAX_NEW tokens are generated and MAX_NEW-1 of them are fed back.
    out = extract_teacher_maps(
        tiny_vlm,
        samples_for(images[:2]),
        tiny_preset,
        max_new_tokens=MAX_NEW,
        generation_kwargs={"eos_token_id": 10**6 % len(tiny_vlm.tokenizer)},
    )
    assert all(r.n_steps == MAX_NEW - 1 for r in out.records)


def test_only_configured_layers_are_read(tiny_vlm, tiny_preset, images, monkeypatch):
    seen: list[tuple[int, int]] = []
    original = teacher_mod._Capture.record

    def spy(self, module, query, key, mask, scaling):
        seen.append((self.layer_of[id(module)], query.shape[2]))
        return original(self, module, query, key, mask, scaling)

    monkeypatch.setattr(teacher_mod._Capture, "record", spy)
    extract_teacher_maps(
        tiny_vlm,
        samples_for(images[:2]),
        tiny_preset,
        max_new_tokens=4,
        generation_kwargs={"eos_token_id": 10**6 % len(tiny_vlm.tokenizer)},
    )
    assert {layer for layer, _ in seen} == set(tiny_preset.heads_needed()) == {0, 1, 2}
    assert all(q == 1 for _, q in seen)  # decode steps only, never the prefill
    assert len(seen) == 3 * (4 - 1)  # 3 layers × 3 decode steps
    assert tiny_vlm.model.config.text_config._attn_implementation == "sdpa"  # restored


def test_preset_outside_the_model_fails_at_start_naming_index_and_size(tiny_vlm, images):
    with pytest.raises(AdapterError, match=r"layer 14 is outside the model's 4 layers"):
        extract_teacher_maps(tiny_vlm, samples_for(images), PRESETS["llava-1.5-7b"])
    bad_head = get_preset("llava-1.5-7b", grounding={1: (7,)}, sink={}, K=1, T=2)
    with pytest.raises(AdapterError, match=r"head 7 of layer 1 is outside the model's 4 heads"):
        extract_teacher_maps(tiny_vlm, samples_for(images), bad_head)


def test_bad_samples_are_recorded_and_skipped(tiny_vlm, tiny_preset, tmp_path, images, caplog):
    good = tmp_path / "good.png"
    images[0].save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    samples = [
        Sample("ok1", str(good), "what is it ?"),
        Sample("missing", str(tmp_path / "nope.jpg"), "what is it ?"),
        Sample("truncated", str(truncated), "what is it ?"),
        Sample("text", str(text), "what is it ?"),
        Sample("empty-q", str(good), "   "),
        Sample("ok2", images[1], "and this ?"),
    ]
    caplog.set_level("INFO", logger=teacher_mod.log.name)
    out = extract_teacher_maps(tiny_vlm, samples, tiny_preset, batch_size=4, max_new_tokens=3)
    assert [r.sample_id for r in out.records] == ["ok1", "ok2"]
    assert "teacher: 6/6 (" in caplog.text and " rejected=4" in caplog.text  # the progress line counts them
    reasons = {r.sample_id: r.reason for r in out.rejected}
    assert set(reasons) == {"missing", "truncated", "text", "empty-q"}
    assert "not found" in reasons["missing"] and "nope.jpg" in reasons["missing"]
    assert "truncated.png" in reasons["truncated"]
    assert "not an image" in reasons["text"]
    assert reasons["empty-q"] == "empty question"


def test_processor_rejection_is_recorded(tiny_vlm, tiny_preset, images, monkeypatch):
    """Fault injection: a processor that refuses very wide images, as real processors refuse some inputs."""
    real = tiny_vlm.pixel_values

    def picky(image):
        if image.width > 4 * image.height:
            raise ValueError(f"aspect ratio {image.width / image.height:.0f} is not supported")
        return real(image)

    monkeypatch.setattr(tiny_vlm, "pixel_values", picky)
    samples = [Sample("wide", random_image(9, (200, 10)), "q ?"), Sample("fine", images[0], "q ?")]
    out = extract_teacher_maps(tiny_vlm, samples, tiny_preset, max_new_tokens=3)
    assert [r.sample_id for r in out.records] == ["fine"]
    assert "image processor rejected" in out.rejected[0].reason and "aspect ratio" in out.rejected[0].reason


def test_empty_answer_is_rejected(tiny_vlm, tiny_preset, images):
    x = tiny_vlm.build_inputs(images[:1], QUESTIONS[:1])
    with torch.no_grad():
        first = int(tiny_vlm.model(**x.model_kwargs()).logits[0, -1].argmax())
    out = extract_teacher_maps(
        tiny_vlm, samples_for(images[:1]), tiny_preset, max_new_tokens=4, generation_kwargs={"eos_token_id": first}
    )
    assert not out.records and "empty answer" in out.rejected[0].reason


def test_hidden_norms_match_hidden_states(tiny_vlm, tiny_preset, images):
    out = extract_teacher_maps(tiny_vlm, samples_for(images[:1]), tiny_preset, max_new_tokens=2, hidden_norm_layer=1)
    x = tiny_vlm.build_inputs(images[:1], QUESTIONS[:1])
    with torch.no_grad():
        hs = tiny_vlm.model(**x.model_kwargs(), output_hidden_states=True).hidden_states[2]
    expected = hs[0, x.image_positions[0]].norm(dim=-1).numpy()
    np.testing.assert_allclose(out.records[0].image_hidden_norms, expected, rtol=1e-5)


def test_concurrent_threads_on_one_model_get_their_own_maps(tiny_vlm, tiny_preset, images):
    """Threaded task runners share one loaded model; each thread's capture must see only its own attention."""
    import threading

    samples = samples_for(images)
    kw = {"eos_token_id": 10**6 % len(tiny_vlm.tokenizer)}
    sequential = [
        extract_teacher_maps(tiny_vlm, [s], tiny_preset, max_new_tokens=6, generation_kwargs=kw) for s in samples
    ]
    results: dict[int, object] = {}

    def work(i):
        for _ in range(3):
            results[i] = extract_teacher_maps(
                tiny_vlm, [samples[i]], tiny_preset, max_new_tokens=6, generation_kwargs=kw
            )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(samples))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, seq in enumerate(sequential):
        np.testing.assert_allclose(results[i].records[0].grounding, seq.records[0].grounding, rtol=1e-4, atol=1e-7)
        assert results[i].records[0].grounding.sum() > 0
    assert tiny_vlm.model.config.text_config._attn_implementation == "sdpa"


def test_prompt_attention_equals_output_attentions(tiny_vlm, images):
    from sdrpn_core.teacher import prompt_attention

    x = tiny_vlm.build_inputs(images[:2], QUESTIONS[:2])
    ours = prompt_attention(tiny_vlm, x, layer=2)
    previous = tiny_vlm.model.config.text_config._attn_implementation
    tiny_vlm.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = tiny_vlm.model(**x.model_kwargs(), position_ids=tiny_vlm.position_ids(x), output_attentions=True)
    finally:
        tiny_vlm.model.set_attn_implementation({"text_config": previous})
    for b in range(2):
        ref = out.attentions[2][b, :, -1, x.image_positions[b]].mean(0)
        torch.testing.assert_close(ours[b], ref, rtol=1e-5, atol=1e-7)


def test_head_scores_rank_heads_against_ground_truth_boxes(tiny_vlm, images):
    from sdrpn_core.heads import score_heads
    from sdrpn_core.roi import pixels_to_grid_box

    samples = [(im, q, (0, 0, im.width // 2, im.height // 2)) for im, q in zip(images, QUESTIONS, strict=True)]
    scores = score_heads(tiny_vlm, samples, layers=[1, 2], max_new_tokens=3)
    assert len(scores) == 2 * tiny_vlm.num_heads
    assert {(s.layer, s.head) for s in scores} == {(la, h) for la in (1, 2) for h in range(4)}
    assert all(0 <= s.hit_rate <= 1 and 0 <= s.mass <= 1 for s in scores)
    assert [s.hit_rate for s in scores] == sorted((s.hit_rate for s in scores), reverse=True)
    # per-head maps averaged equal the teacher's map for the same heads
    preset = get_preset("llava-1.5-7b", grounding={2: (0, 3)}, sink={}, K=1, T=1)
    out = extract_teacher_maps(tiny_vlm, samples_for(images[:1]), preset, max_new_tokens=3)
    from sdrpn_core.heads import _per_head

    x = tiny_vlm.build_inputs(images[:1], QUESTIONS[:1])
    per = _per_head(tiny_vlm, x, preset.override(grounding={2: None}), [2], 3)
    np.testing.assert_allclose(per[0, 0, [0, 3]].mean(0).numpy(), out.records[0].grounding, rtol=1e-5, atol=1e-7)
    assert pixels_to_grid_box((0, 0, 40, 28), (40, 28), (4, 4), 32) == (0, 0, 4, 4)
    assert pixels_to_grid_box((0, 0, 20, 14), (40, 28), (4, 4), 32) == (0, 0, 2, 3)


def test_maps_equal_a_reference_written_out_in_the_test(tiny_vlm, tiny_preset, images, early_eos):
    """Independent of the module's averaging helpers: `generate(output_attentions=True)` one sample at a time, then,
    by hand, the mean over the answer tokens that were fed back (up to the first EOS; never the last token), then
    the plain mean over the preset's (layer, head) pairs, each pair weighted equally whatever its layer holds."""
    out = extract_teacher_maps(
        tiny_vlm,
        samples_for(images),
        tiny_preset,
        batch_size=4,
        max_new_tokens=MAX_NEW,
        generation_kwargs={"eos_token_id": early_eos},
    )
    pairs = [(layer, h) for layer, heads in tiny_preset.grounding.items() for h in heads]
    assert len({layer for layer, _ in pairs}) > 1 and len(pairs) > len({layer for layer, _ in pairs})
    model = tiny_vlm.model
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        for i, (image, question) in enumerate(zip(images, QUESTIONS, strict=False)):
            x = tiny_vlm.build_inputs([image], [question])
            with torch.no_grad():
                g = model.generate(
                    **x.model_kwargs(),
                    max_new_tokens=MAX_NEW,
                    do_sample=False,
                    eos_token_id=early_eos,
                    output_attentions=True,
                    return_dict_in_generate=True,
                )
            answer = g.sequences[0, x.input_ids.shape[1] :].tolist()
            fed = answer.index(early_eos) if early_eos in answer else len(answer) - 1
            image_cols = x.image_positions[0]
            total = torch.zeros(len(image_cols))
            for layer, head in pairs:
                per_step = [g.attentions[1 + t][layer][0, head, -1, image_cols].float() for t in range(fed)]
                total += sum(per_step) / fed
            expected = (total / len(pairs)).numpy()
            rec = out.records[i]
            assert rec.n_steps == fed
            np.testing.assert_allclose(rec.grounding, expected, rtol=1e-4, atol=1e-7)
    finally:
        model.set_attn_implementation({"text_config": previous})


# -- written against mutation survivors (benchmarks/results/mutation.md) -------------------------------------------


def test_average_maps_by_hand():
    """Two rows with 1 and 3 valid steps (a 1-step row divides by 1, not by a clamped 2), a layer read at heads
    (0, 2) of which the spec takes head 2 only, and an empty spec giving zeros of the batch's shape."""
    from sdrpn_core.teacher import average_maps

    steps = {1: torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 2)}  # [S=3, B=2, h=2, n_img=2]
    n_valid = torch.tensor([1, 3])
    got = average_maps(steps, {1: [0, 2]}, {1: (2,)}, n_valid, 2)
    row0 = steps[1][0, 0, 1]  # one step, read column of head 2
    row1 = steps[1][:, 1, 1].mean(0)
    torch.testing.assert_close(got, torch.stack([row0, row1]))
    both = average_maps(steps, {1: [0, 2]}, {1: None}, n_valid, 2)
    torch.testing.assert_close(both[1], steps[1][:, 1].mean(0).mean(0))
    per_head = average_maps(steps, {1: [0, 2]}, {1: (2, 0)}, n_valid, 2, per_head=True)
    torch.testing.assert_close(per_head[0], steps[1][0, 0, [1, 0]])
    empty = average_maps(steps, {1: [0, 2]}, {}, n_valid, 5)
    assert empty.shape == (2, 5) and not empty.any()


def test_records_carry_the_sample_and_float32_maps(tiny_vlm, tiny_preset, images, tmp_path):
    path = tmp_path / "a.png"
    images[0].save(path)
    samples = [Sample("a", str(path), "what is here ?"), Sample("b", images[1], "and here ?")]
    out = extract_teacher_maps(tiny_vlm, samples, tiny_preset, max_new_tokens=3, hidden_norm_layer=0)
    a, b = out.records
    assert (a.image, a.question, a.image_size) == (str(path), "what is here ?", images[0].size)
    assert (b.question, b.image_size) == ("and here ?", images[1].size)
    for rec in (a, b):
        assert rec.grounding.dtype == rec.sink.dtype == rec.image_hidden_norms.dtype == np.float32


def test_hidden_norm_layer_bounds(tiny_vlm, tiny_preset, images):
    last = tiny_vlm.num_layers - 1
    out = extract_teacher_maps(tiny_vlm, samples_for(images[:1]), tiny_preset, max_new_tokens=2, hidden_norm_layer=last)
    assert out.records[0].image_hidden_norms.shape == (tiny_vlm.num_image_tokens,)
    for bad in (-1, tiny_vlm.num_layers):
        with pytest.raises(ValueError, match=rf"hidden_norm_layer {bad} outside the model's 4 layers"):
            extract_teacher_maps(tiny_vlm, samples_for(images[:1]), tiny_preset, hidden_norm_layer=bad)


def spy_batches(monkeypatch, adapter, fail_on: str | None = None) -> list[list[str]]:
    """Record the questions of every generate call the teacher makes; raise inside a call holding `fail_on`
    (fault injection, as a CUDA error or a bad sample would)."""
    calls: list[list[str]] = []
    collated: list[list[str]] = []
    real_collate, real_generate = adapter.collate, teacher_mod._generate_batch

    def collate(pixels, questions):
        collated.append(list(questions))
        return real_collate(pixels, questions)

    def generate(adapter, inputs, *args, **kwargs):
        calls.append(collated[-1])
        if fail_on in calls[-1]:
            raise RuntimeError(f"injected failure on {fail_on!r}")
        return real_generate(adapter, inputs, *args, **kwargs)

    monkeypatch.setattr(adapter, "collate", collate)
    monkeypatch.setattr(teacher_mod, "_generate_batch", generate)
    return calls


def test_a_failing_batch_is_retried_one_sample_at_a_time(tiny_vlm, tiny_preset, images, monkeypatch):
    calls = spy_batches(monkeypatch, tiny_vlm, fail_on="bad ?")
    samples = [Sample("s0", images[0], "one ?"), Sample("bad", images[1], "bad ?"), Sample("s2", images[2], "two ?")]
    seen: list[tuple[int, int]] = []
    out = extract_teacher_maps(
        tiny_vlm, samples, tiny_preset, batch_size=3, max_new_tokens=2, progress=lambda d, t: seen.append((d, t))
    )
    assert calls == [["one ?", "bad ?", "two ?"], ["one ?"], ["bad ?"], ["two ?"]]
    assert [r.sample_id for r in out.records] == ["s0", "s2"]
    assert [(r.sample_id, r.reason) for r in out.rejected] == [
        ("bad", "generation failed: RuntimeError: injected failure on 'bad ?'")
    ]
    assert seen == [(3, 3)]


def test_a_failing_single_sample_batch_is_rejected_once(tiny_vlm, tiny_preset, images, monkeypatch):
    calls = spy_batches(monkeypatch, tiny_vlm, fail_on="bad ?")
    samples = [Sample("bad", images[1], "bad ?"), Sample("s1", images[0], "one ?")]
    seen: list[tuple[int, int]] = []
    out = extract_teacher_maps(
        tiny_vlm, samples, tiny_preset, batch_size=1, max_new_tokens=2, progress=lambda d, t: seen.append((d, t))
    )
    assert calls == [["bad ?"], ["one ?"]]
    assert [r.sample_id for r in out.records] == ["s1"]
    assert [(r.sample_id, r.reason) for r in out.rejected] == [
        ("bad", "generation failed: RuntimeError: injected failure on 'bad ?'")
    ]
    assert seen == [(1, 2), (2, 2)]


def test_a_failing_pair_is_retried_one_sample_at_a_time(tiny_vlm, tiny_preset, images, monkeypatch):
    calls = spy_batches(monkeypatch, tiny_vlm, fail_on="bad ?")
    samples = [Sample("bad", images[1], "bad ?"), Sample("s1", images[0], "one ?")]
    out = extract_teacher_maps(tiny_vlm, samples, tiny_preset, batch_size=2, max_new_tokens=2)
    assert calls == [["bad ?", "one ?"], ["bad ?"], ["one ?"]]
    assert [r.sample_id for r in out.records] == ["s1"] and [r.sample_id for r in out.rejected] == ["bad"]


def test_default_batch_is_eight_samples(tiny_llava, images, monkeypatch):
    preset = get_preset("llava-1.5-7b", grounding={2: (0,)}, sink={}, K=1, T=2)
    calls = spy_batches(monkeypatch, tiny_llava)
    samples = [Sample(f"s{i}", images[i % 4], f"q{i} ?") for i in range(9)]
    out = extract_teacher_maps(tiny_llava, samples, preset, max_new_tokens=2)
    assert [len(c) for c in calls] == [8, 1] and len(out.records) == 9


def test_rows_of_different_grids_are_generated_apart(monkeypatch):
    """Qwen's dynamic resolution: a batch whose images give two grids is split into one generate per grid."""
    from sdrpn_core.models.qwen import QwenSettings
    from sdrpn_core.models.tiny import TinyQwenSpec, build_tiny_qwen

    settings = QwenSettings(min_pixels=56 * 56, max_pixels=112 * 112, pad_square=False)
    qwen = build_tiny_qwen(TinyQwenSpec(), settings=settings)
    preset = get_preset("qwen2.5-vl-7b/natural", grounding={2: (0,)}, sink={}, K=1, T=2)
    calls = spy_batches(monkeypatch, qwen)
    samples = [
        Sample("wide", random_image(1, (112, 56)), "wide ?"),
        Sample("square", random_image(2, (112, 112)), "square ?"),
        Sample("wide2", random_image(3, (112, 56)), "wide two ?"),
    ]
    out = extract_teacher_maps(qwen, samples, preset, max_new_tokens=2)
    assert calls == [["wide ?", "wide two ?"], ["square ?"]]
    grids = {r.sample_id: r.grid for r in out.records}
    assert grids["wide"] == grids["wide2"] != grids["square"] and not out.rejected


def test_an_empty_answer_does_not_stop_the_batch(tiny_vlm, tiny_preset, images):
    x = tiny_vlm.build_inputs(images, QUESTIONS)
    with torch.no_grad():
        first = tiny_vlm.model(**x.model_kwargs()).logits[:, -1].argmax(-1).tolist()
    later = next(i for i in range(1, len(first)) if first[i] != first[0])
    samples = [samples_for(images)[0], samples_for(images)[later]]
    out = extract_teacher_maps(
        tiny_vlm, samples, tiny_preset, max_new_tokens=3, generation_kwargs={"eos_token_id": first[0]}
    )
    assert [r.sample_id for r in out.rejected] == ["s0"] and [r.sample_id for r in out.records] == [f"s{later}"]


def test_capture_matches_eager_attention_with_padding(tiny_vlm, tiny_preset, images, early_eos):
    """Under the eager kernel the mask is additive (floats), under SDPA boolean: both give the reference maps."""
    kw = {"eos_token_id": early_eos}
    sdpa = extract_teacher_maps(
        tiny_vlm, samples_for(images), tiny_preset, max_new_tokens=MAX_NEW, generation_kwargs=kw
    )
    model = tiny_vlm.model
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        eager = extract_teacher_maps(
            tiny_vlm, samples_for(images), tiny_preset, max_new_tokens=MAX_NEW, generation_kwargs=kw
        )
        assert model.config.text_config._attn_implementation == "eager"  # restored to the eager it found
    finally:
        model.set_attn_implementation({"text_config": previous})
    assert len({len(q) for q in QUESTIONS}) > 1  # left padding in the batch
    for a, b in zip(sdpa.records, eager.records, strict=True):
        np.testing.assert_allclose(a.grounding, b.grounding, rtol=1e-4, atol=1e-7)


def test_maps_stay_float32_under_a_bfloat16_model(images):
    """The paper's maps are fp32 softmax rows: under a bf16 model they must hold values bf16 cannot represent."""
    from sdrpn_core.models import LlavaAdapter
    from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava

    adapter = LlavaAdapter(*build_tiny_llava(TinyLlavaSpec(), dtype=torch.bfloat16))
    preset = get_preset("llava-1.5-7b", grounding={2: (0, 3), 1: (2,)}, sink={0: None}, K=1, T=2)
    kw = {"eos_token_id": 10**6 % len(adapter.tokenizer)}
    out = extract_teacher_maps(adapter, samples_for(images[:2]), preset, max_new_tokens=4, generation_kwargs=kw)
    g = torch.from_numpy(out.records[0].grounding)
    assert not torch.equal(g, g.to(torch.bfloat16).float())
    x = adapter.build_inputs(images[:2], QUESTIONS[:2])
    ref_g, _, _ = reference_maps_output_attentions(adapter, x, preset, 4, **kw)
    np.testing.assert_allclose(out.records[0].grounding, ref_g[0].numpy(), rtol=2e-2, atol=1e-3)


def test_reference_restores_the_kernel_and_handles_no_decode_step(tiny_vlm, tiny_preset, images):
    x = tiny_vlm.build_inputs(images[:2], QUESTIONS[:2])
    g, s, gen = reference_maps_output_attentions(tiny_vlm, x, tiny_preset, 1)
    assert tiny_vlm.model.config.text_config._attn_implementation == "sdpa"
    assert g.shape == s.shape == (2, tiny_vlm.num_image_tokens) and not g.any() and gen.shape == (2, 1)


def test_reference_is_greedy_restores_an_eager_model_and_handles_an_empty_sink_spec(tiny_vlm, images, monkeypatch):
    """A checkpoint whose generation config samples (as some Instruct configs do) still gives greedy maps; a model
    found on the eager kernel is left on it; a preset without sink heads gives an all-zero sink map."""
    preset = get_preset("llava-1.5-7b", grounding={2: (0, 3)}, sink={}, K=1, T=2)
    x = tiny_vlm.build_inputs(images[:2], QUESTIONS[:2])
    greedy_g, sink, gen = reference_maps_output_attentions(tiny_vlm, x, preset, 4)
    assert sink.shape == (2, tiny_vlm.num_image_tokens) and not sink.any()
    config = tiny_vlm.model.generation_config
    for key, value in {"do_sample": True, "temperature": 5.0, "top_k": 50, "num_beams": 2}.items():
        monkeypatch.setattr(config, key, value)
    previous = tiny_vlm.model.config.text_config._attn_implementation
    tiny_vlm.model.set_attn_implementation({"text_config": "eager"})
    try:
        torch.manual_seed(0)
        g, _, gen2 = reference_maps_output_attentions(tiny_vlm, x, preset, 4)
        assert tiny_vlm.model.config.text_config._attn_implementation == "eager"
        out = extract_teacher_maps(tiny_vlm, samples_for(images[:2]), preset, max_new_tokens=4)
    finally:
        tiny_vlm.model.set_attn_implementation({"text_config": previous})
    assert torch.equal(gen, gen2) and torch.allclose(g, greedy_g, atol=1e-6)
    np.testing.assert_allclose(out.records[0].grounding, greedy_g[0].numpy(), rtol=1e-4, atol=1e-6)


def test_the_capture_function_outside_a_capture_only_runs_the_models_kernel():
    """Installed for the whole process: a thread that is not capturing passes straight through."""
    assert not teacher_mod._ACTIVE.stack
    ran = teacher_mod.capture_attention(lambda *a, **k: ("kernel", a[1:], k), object(), "q", "k", "v", None, scaling=1)
    assert ran == ("kernel", ("q", "k", "v", None), {"scaling": 1})
