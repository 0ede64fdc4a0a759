"""Each interpretability metric against an independent computation (docs/interpretability.md)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from e2edict.backbones import TLBackbone
from e2edict.backbones.tl_attention import fused_attention_inside
from e2edict.interpret import explain
from e2edict.interpret.absorption import AbsorptionConfig, build_prompts, word_absorption
from e2edict.interpret.autointerp import parse_predictions, score_predictions
from e2edict.interpret.contexts import collect_examples, firing_stats
from e2edict.interpret.probing import sparse_probing
from e2edict.interpret.reading import Reader, token_strings
from e2edict.interpret.tasks import Task, builtin_task, one_vs_rest
from e2edict.saes.relu import ReLUSAE

HOOK = "blocks.2.hook_resid_pre"


# --- sparse probing --------------------------------------------------------------------------
def test_planted_probe_latent_reaches_the_full_activation_probe(tiny_model):
    """A latent whose encoder is the full-activation probe's direction (and whose bias keeps it
    always on, so its pooled value is the probe's score) is ranked first, and its top-1 accuracy
    is the probe's; the ceiling is recomputed here from TransformerLens's own cache."""
    with fused_attention_inside(tiny_model):  # the shared model is handed back as it came
        _planted(tiny_model, TLBackbone(tiny_model, "tiny"))


def _planted(tiny_model, backbone):
    full = builtin_task("testament")
    rng = np.random.default_rng(0)
    keep = sorted(rng.choice(len(full.texts), 600, replace=False).tolist())
    task = Task("testament", [full.texts[i] for i in keep], [full.labels[i] for i in keep])
    split = one_vs_rest(task, 200, 100, seed=0)[0]
    reader = Reader(backbone, {HOOK: ReLUSAE(128, 32, HOOK)}, batch_size=32)
    rows, mask = reader.encode_texts(task.texts, 128)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(rows, names_filter=[HOOK])
    m = mask.double().unsqueeze(-1)
    pooled = ((cache[HOOK].double() * m).sum(1) / m.sum(1)).numpy()
    probe = LogisticRegression(C=1.0, max_iter=1000).fit(pooled[split.train], split.train_y)
    ceiling = (probe.predict(pooled[split.test]) == np.asarray(split.test_y)).mean()

    sae = reader.saes[HOOK]
    with torch.no_grad():
        sae.W_enc_T.zero_()
        sae.b_enc.fill_(-1.0)  # every other latent is off
        sae.b_dec.zero_()
        w = torch.from_numpy(probe.coef_[0]).float()
        sae.W_enc_T[0] = 10 * w
        sae.b_enc[0] = 10 * (float(np.abs(pooled @ probe.coef_[0]).max()) * 4 + 1)  # positive on every token
    result = sparse_probing(reader, [task], n_train=200, n_test=100, ks=(1, 2), n_ctx=128, seed=0)[HOOK]
    entry = result["tasks"]["testament/new"]
    assert entry["top_latents"][0] == 0
    assert entry["llm_test_accuracy"] == pytest.approx(ceiling, abs=1e-9)
    assert entry["sae_top_1_test_accuracy"] >= ceiling - 0.02
    assert ceiling > 0.8


def test_one_vs_rest_is_balanced_and_disjoint():
    task = Task("t", [f"text {i}" for i in range(300)], ["a"] * 100 + ["b"] * 100 + ["c"] * 100)
    splits = one_vs_rest(task, 60, 20, seed=3)
    assert [s.name for s in splits] == ["t/a", "t/b", "t/c"]
    for s in splits:
        assert len(s.train) == 60 and len(s.test) == 20 and sum(s.train_y) == 30 and sum(s.test_y) == 10
        assert not set(s.train) & set(s.test)
        c = s.name[-1]
        assert all((task.labels[i] == c) == bool(y) for i, y in zip(s.train, s.train_y, strict=True))
    two = Task("u", [f"x{i}" for i in range(40)], ["p"] * 20 + ["q"] * 20)
    assert len(one_vs_rest(two, 20, 8, seed=0)) == 1


def test_builtin_tasks_have_their_classes():
    src = builtin_task("source")
    assert src.classes == ["austen", "jargon", "kjv", "shakespeare"]
    t = builtin_task("testament")
    assert t.classes == ["new", "old"] and t.labels.count("new") > 500
    d = builtin_task("dialogue")
    assert d.classes == ["dialogue", "narration"]
    assert all(p.startswith('"') == (lab == "dialogue") for p, lab in zip(d.texts, d.labels, strict=True))


# --- absorption ------------------------------------------------------------------------------
CFG = AbsorptionConfig()


def test_absorption_fraction_by_hand():
    cos = torch.tensor([0.9, 0.5, 0.0, 0.05])
    # the main latent 0 is silent; latent 1 carries 1.0 of the 1.5 projection: fully absorbed
    f, full = word_absorption(torch.tensor([0.0, 2.0, 5.0, 0.0]), cos, 1.5, [0], CFG)
    assert f == 1.0 and full
    # the main latent carries 0.9, latent 1 adds 1.0 but only 0.6 is missing: 0.6 / (0.6 + 0.9)
    f, full = word_absorption(torch.tensor([1.0, 2.0, 0.0, 0.0]), cos, 1.5, [0], CFG)
    assert f == pytest.approx(0.6 / 1.5) and not full
    # the main latent explains the projection: nothing absorbed
    f, full = word_absorption(torch.tensor([2.0, 2.0, 0.0, 0.0]), cos, 1.5, [0], CFG)
    assert f == 0.0 and not full
    # the other latent is below the 0.1 cosine bar (0.05): it cannot absorb; nor is 0.3 / 1.5 >= 0.4
    f, full = word_absorption(torch.tensor([0.0, 0.0, 0.0, 6.0]), cos, 1.5, [0], CFG)
    assert f == 0.0 and not full
    # at most 3 absorbers count: four latents each carrying 0.2 of 1.0 give 0.6, not 0.8
    cos4 = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5])
    f, _ = word_absorption(torch.tensor([0.2, 0.4, 0.4, 0.4, 0.4]), cos4, 1.0, [0], CFG)
    main, absorbed = 0.18, min(0.6, 1.0 - 0.18)
    assert f == pytest.approx(absorbed / (absorbed + main))


def test_absorption_prompts_meet_the_tokenizer_conditions(tiny_model):
    p = build_prompts(tiny_model.tokenizer, 0, AbsorptionConfig(max_words=200), 128)
    assert len(p.words) > 150 and len(set(map(len, p.rows.tolist()))) == 1
    for word, row in zip(p.words[:50], p.rows.tolist()[:50], strict=True):
        assert tiny_model.tokenizer.decode([row[p.position]]) == word
        assert tiny_model.tokenizer.decode(row[p.position + 1 :]) == " has the first letter:"


# --- explanations ----------------------------------------------------------------------------
def _synthetic(x: torch.Tensor, token: int = 7, first: int = 11, second: int = 12) -> torch.Tensor:
    """Latent 0 fires (2.0) exactly on ``token``; latent 1 (3.0) on ``second`` right after ``first``."""
    a = torch.zeros(*x.shape, 2)
    a[..., 0] = 2.0 * (x == token)
    a[:, 1:, 1] = 3.0 * ((x[:, 1:] == second) & (x[:, :-1] == first))
    a[:, 0] = 0.0
    return a


def test_a_latent_that_fires_on_one_token_is_explained_exactly():
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, 40, (64, 32), generator=g)
    seqs[:, 0] = 0
    seqs[::3, 5], seqs[::3, 6] = 11, 12  # the bigram appears; 12 also appears alone elsewhere
    count, peak = firing_stats(_synthetic, seqs[:32], 2, 8)
    assert count.tolist() == [int((seqs[:32, 1:] == 7).sum()), int(_synthetic(seqs[:32])[..., 1].gt(0).sum())]
    counted = explain.TokenSets(0.5 * peak, 40)
    ex = collect_examples(_synthetic, seqs[:32], 2, 5, 3, 4, 8, seed=0, consumers=[counted.add])
    patterns = explain.build_patterns(_synthetic, seqs[:32], ex, mask_token=0, bos=0)
    assert patterns[0] == [(7,)] and patterns[1] == [(11, 12)]
    sets = counted.sets()
    assert sets[0] == [7]
    ngram, tokset = explain.score(_synthetic, seqs[32:], 0.5 * peak, patterns, sets, 8)
    assert ngram.precision().tolist() == [1.0, 1.0] and ngram.recall().tolist() == [1.0, 1.0]
    assert tokset.precision()[0] == 1.0 and tokset.recall()[0] == 1.0
    # the token-set baseline cannot tell the bigram: 12 alone fires nothing
    assert 12 not in sets[1] or tokset.precision()[1] < 1.0


def test_pattern_matching_against_a_loop():
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 4, (5, 20), generator=g).numpy()
    pat = (2, None, 3)
    hit = explain.matches(toks, pat)
    for b in range(5):
        for t in range(20):
            want = t >= 3 and toks[b, t - 2] == 2 and toks[b, t] == 3
            assert hit[b, t] == want


def test_byte_tokens_are_shown_as_bytes(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode("café — “quoted”")
    shown = token_strings(tok, ids)
    assert all("\ufffd" not in s for s in shown)
    partial = [s for s in shown if s.startswith("<0x")]
    assert partial and len(set(partial)) == len(partial)


# --- autointerp arithmetic -------------------------------------------------------------------
def test_detection_score_arithmetic():
    active = [True, False, False, True, False, False, False, False, False, False, False, False, True, False]
    oracle = [i + 1 for i, a in enumerate(active) if a]
    assert score_predictions(oracle, active) == 1.0
    assert score_predictions([], active) == pytest.approx(active.count(False) / len(active))
    assert score_predictions([1, 2], active) == pytest.approx(11 / 14)  # 1 right; 2 named wrongly; 4, 13 missed
    assert parse_predictions("1, 4 and 13.") == [1, 4, 13]
    assert parse_predictions("None") == []
    assert parse_predictions("maybe three") is None


def test_no_projection_along_the_probe_is_no_absorption():
    cos = torch.tensor([0.9, 0.5])
    assert word_absorption(torch.tensor([0.0, 1.0]), cos, 0.0, [0], CFG) == (0.0, False)
    assert word_absorption(torch.tensor([0.0, 1.0]), cos, -0.5, [0], CFG) == (0.0, False)


def test_a_hand_built_sae_whose_other_latent_absorbs_gives_the_fraction_by_hand():
    """Latent 0 (the main one, along the probe e0) fires only past x0 = 1; latent 1 (decoder
    (e0 + e1)/sqrt 2, cos 0.707 with the probe) fires past x1 = 0.5. Word A = [2, 0, 0, 0]: the main
    latent carries 1 of the 2 along the probe, nothing absorbs: 0. Word B = [0.8, 1, 0, 0]: the main
    latent is silent, latent 1 carries 0.5 * 0.707 = 0.354 of 0.8 (44% >= 40%): fully absorbed, 1."""
    from types import SimpleNamespace

    from e2edict.interpret.absorption import _Probes, _score

    sae = ReLUSAE(4, 3, "h")
    with torch.no_grad():
        sae.W_enc_T.zero_()
        sae.W_enc_T[0, 0], sae.W_enc_T[1, 1] = 1.0, 1.0
        sae.b_enc.copy_(torch.tensor([-1.0, -0.5, -1.0]))
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    reader = Reader(SimpleNamespace(adapter=None), {"h": sae})
    acts = np.array([[2.0, 0, 0, 0], [0.8, 1.0, 0, 0]], dtype=np.float32)
    W, b = np.zeros((26, 4)), np.zeros(26)
    W[0, 0] = 1.0  # the probe of letter "a" is e0
    probe = _Probes(W, b)
    y = np.array([0, 0])
    scores = probe.decision(acts) + 0.1  # both words: the probe says "a"
    r = _score(reader, "h", sae, acts, probe, y, [0, 1], scores, {0: [0]}, [0], CFG)
    a = r["letters"]["a"]
    assert a["num_probe_true_positives"] == 2 and a["num_full_absorption"] == 1
    assert a["mean_absorption_fraction"] == pytest.approx(0.5) and a["full_absorption_rate"] == pytest.approx(0.5)
    assert r["mean_absorption_fraction"] == pytest.approx(0.5)


def test_user_tasks_from_parquet_and_a_hugging_face_data_set_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from e2edict.errors import E2EDictError
    from e2edict.interpret.tasks import user_task

    rows = {"sentence": [f"text number {i}" for i in range(40)], "topic": ["a", "b"] * 20}
    pq.write_table(pa.table(rows), tmp_path / "labelled.parquet")
    t = user_task(str(tmp_path / "labelled.parquet"), "sentence", "topic")
    assert t.texts == rows["sentence"] and t.labels == rows["topic"] and t.classes == ["a", "b"]
    folder = tmp_path / "hf"
    folder.mkdir()
    pq.write_table(pa.table(rows), folder / "train.parquet")
    t = user_task(str(folder), "sentence", "topic", split="train")  # datasets.load_dataset reads the folder offline
    assert t.texts == rows["sentence"] and t.labels == rows["topic"]
    with pytest.raises(E2EDictError, match="not a .jsonl/.csv/.parquet file and not a loadable data set"):
        user_task(str(tmp_path / "missing-data-set"), "sentence", "topic")
