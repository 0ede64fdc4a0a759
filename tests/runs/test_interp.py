"""`e2edict interp` through the command line and `e2edict.interp` through the API: TransformerLens
and Hugging Face runs, every architecture, a transcoder run, SAEs from elsewhere; bad input ends in
one line, exit 2, nothing written."""

import json

import numpy as np
import pytest
from conftest import ROOT

import e2edict
from e2edict.assets import TINY_MODEL_DIR
from e2edict.cli import main

QUICK = ["--tokens", "4096", "--latents", "6", "--contexts", "5", "--tasks", "testament", "--probe-train", "60",
         "--probe-test", "20", "--absorption-max-words", "300", "--absorption-min-f1", "0", "--absorption-min-letters", "1",
         "--quiet"]  # fmt: skip
SHORT = ["train.tokens=2048", "eval.tokens=1024", "eval.alive_tokens=1024", "train.log_every=1"]


def _train(tmp, name, config, *overrides):
    return e2edict.train(ROOT / config, overrides=[*SHORT, *overrides], out=tmp / name, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interp-runs")
    return {
        "relu": _train(tmp, "relu", "configs/tiny/e2e.yaml"),
        "hf-topk": _train(
            tmp, "hf-topk", "configs/tiny/topk-e2e.yaml", "model.backend=huggingface", "saes.positions=[transformer.h.2:input]"
        ),
        "jumprelu": _train(tmp, "jumprelu", "configs/tiny/e2e.yaml", "saes.architecture=jumprelu"),
        "matryoshka": _train(tmp, "matryoshka", "configs/tiny/matryoshka-e2e.yaml"),
        "transcoder": _train(tmp, "transcoder", "configs/tiny/transcoders-e2e.yaml", "saes.positions=[blocks.1.mlp]"),
    }


def _check(result: dict, hooks: list[str]):
    assert sorted(result["saes"]) == sorted(hooks)
    for entry in result["saes"].values():
        sp = entry["sparse_probing"]
        assert 0.5 <= sp["llm_test_accuracy"] <= 1.0
        for k in (1, 2, 5, 10):
            assert 0.0 <= sp[f"sae_top_{k}_test_accuracy"] <= 1.0
        ab = entry["absorption"]
        assert 0.0 <= ab["mean_absorption_fraction"] <= 1.0 and ab["mean_num_split_features"] >= 0
        ex = entry["explanations"]
        assert ex["latents"] == 6 and 0.0 <= ex["precision"]["mean"] <= 1.0
        assert all(isinstance(p, str) for lat in ex["per_latent"].values() for p in lat["patterns"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "hf-topk", "jumprelu", "matryoshka", "transcoder"])
def test_interp_cli_on_each_run(runs, name, capsys):
    assert main(["interp", str(runs[name]), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "probe_top1_acc" in out and "ngram_precision" in out
    result = json.loads((runs[name] / "interp.json").read_text())
    saes = e2edict.load_saes(runs[name])
    _check(result, list(saes))
    assert "autointerp_skipped" in result  # no endpoint given
    if name == "transcoder":
        assert next(iter(saes.values())).hook_name_out is not None


@pytest.mark.slow
def test_interp_api_matches_the_cli_on_the_same_data(runs, tiny_model):
    saes = e2edict.load_saes(runs["relu"])
    stream = np.load(TINY_MODEL_DIR / "val_tokens.npy")
    kw = dict(latents=6, contexts=5, tasks=("testament",), probe_train=60, probe_test=20)
    before = [dict(b.attn.__dict__) for b in tiny_model.blocks]
    a = e2edict.interp(tiny_model, saes, stream[: 32 * 127], metrics=["explanations", "sparse_probing"], **kw)
    assert [dict(b.attn.__dict__) for b in tiny_model.blocks] == before  # handed back as it came
    hf = e2edict.load_model("tiny", backend="huggingface")
    b = e2edict.interp(
        hf, saes, stream[: 32 * 127], metrics=["explanations", "sparse_probing"], tokenizer=tiny_model.tokenizer, **kw
    )
    h = "blocks.2.hook_resid_pre"
    for key in ("precision", "recall"):
        assert a["saes"][h]["explanations"][key]["mean"] == pytest.approx(b["saes"][h]["explanations"][key]["mean"], abs=0.02)
    assert a["saes"][h]["sparse_probing"]["llm_test_accuracy"] == pytest.approx(
        b["saes"][h]["sparse_probing"]["llm_test_accuracy"], abs=0.03
    )


@pytest.mark.slow
def test_interp_of_saes_from_elsewhere(runs, tmp_path):
    out = tmp_path / "foreign"
    folder = runs["relu"] / "saes" / "blocks.2.hook_resid_pre"
    assert main(["interp", "--saes", str(folder), "--model", "tiny", "--out", str(out), "--metrics", "explanations", *QUICK]) == 0
    result = json.loads((out / "interp.json").read_text())
    assert list(result["saes"]) == ["blocks.2.hook_resid_pre"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics", "explanations,vibes"], "unknown metric(s) 'vibes'"),
        (["--tasks", "source,poetry"], "unknown built-in probing task(s) 'poetry'"),
        (["--llm-url", "http://127.0.0.1:9/v1"], "autointerp needs both --llm-url and --llm-model"),
    ],
)
def test_bad_options_are_one_line_before_anything_loads(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    assert main(["interp", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (run_dir / "interp.json").exists()


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        (
            [{"text": "a b c", "label": "x"}, {"text": "d e f", "label": "y"}],
            ["--label-column", "topic"],
            "no label column 'topic'",
        ),
        ([{"text": "a b c", "label": "x"}, {"text": "d e f", "label": "x"}], [], "has 1 class (x)"),
    ],
)
def test_bad_probing_data_is_one_line(tmp_path, capsys, rows, extra, message):
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    assert main(["interp", str(run_dir), "--task-data", str(data), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (run_dir / "interp.json").exists()


@pytest.mark.slow
def test_refusing_endpoint_is_one_line_and_writes_nothing(runs, capsys):
    target = runs["jumprelu"]
    before = (target / "interp.json").read_text() if (target / "interp.json").exists() else None
    code = main(["interp", str(target), *QUICK, "--metrics", "autointerp", "--llm-url", "http://127.0.0.1:9/v1",
                 "--llm-model", "m", "--llm-timeout", "1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("e2edict: error: autointerp: the endpoint http://127.0.0.1:9/v1 failed")
    after = (target / "interp.json").read_text() if (target / "interp.json").exists() else None
    assert after == before


@pytest.mark.slow
def test_user_task_from_a_labelled_file(runs, tmp_path):
    from e2edict.interpret.tasks import builtin_task

    t = builtin_task("dialogue")
    rng = np.random.default_rng(0)
    idx = rng.choice(len(t.texts), 200, replace=False)
    data = tmp_path / "speech.csv"
    import csv

    with data.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["passage", "kind"])
        w.writeheader()
        for i in idx:
            w.writerow({"passage": t.texts[i], "kind": t.labels[i]})
    args = ["interp", str(runs["relu"]), *QUICK, "--metrics", "sparse_probing", "--tasks", "", "--task-data", str(data),
            "--text-column", "passage", "--label-column", "kind"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((runs["relu"] / "interp.json").read_text())
    tasks = result["saes"]["blocks.2.hook_resid_pre"]["sparse_probing"]["tasks"]
    assert list(tasks) == ["speech/dialogue"] and tasks["speech/dialogue"]["llm_test_accuracy"] > 0.8


@pytest.mark.slow
def test_interp_joins_compare_and_the_report(runs, tmp_path, capsys):
    import csv

    for name in ("relu", "jumprelu"):
        assert main(["interp", str(runs[name]), *QUICK, "--metrics", "explanations,sparse_probing"]) == 0
    # a later metric keeps the earlier ones (interp.json is merged, not replaced)
    assert main(["interp", str(runs["relu"]), *QUICK, "--metrics", "absorption"]) == 0
    kept = json.loads((runs["relu"] / "interp.json").read_text())
    assert {"explanations", "sparse_probing", "absorption"} <= set(kept["saes"]["blocks.2.hook_resid_pre"])
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["relu"]), str(runs["jumprelu"]), "--out", str(out), "--quiet"]) == 0
    assert "probe_top1_acc" in capsys.readouterr().out
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    sp = kept["saes"]["blocks.2.hook_resid_pre"]["sparse_probing"]
    assert float(rows[0]["probe_top1_acc"]) == pytest.approx(sp["sae_top_1_test_accuracy"])
    assert float(rows[0]["ngram_precision"]) == pytest.approx(
        kept["saes"]["blocks.2.hook_resid_pre"]["explanations"]["precision"]["mean"]
    )
    assert (out / "interp_vs_l0.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(runs["relu"]), "--tokens", "2048", "--features", "5", "--quiet"]) == 0
    pages = "".join(p.read_text() for p in (runs["relu"] / "report").glob("sae0_features_*.html"))
    explained = kept["saes"]["blocks.2.hook_resid_pre"]["explanations"]["per_latent"]
    for latent in explained:
        assert f'id="f{latent}"' in pages
    assert pages.count('class="interp"') >= len(explained)
    assert "<<" not in pages and "\ufffd" not in pages


@pytest.mark.slow
def test_autointerp_through_the_cli_caches_in_the_run_and_never_writes_the_key(runs, capsys):
    from support import Server

    target = runs["matryoshka"]
    srv = Server("oracle")
    try:
        args = ["interp", str(target), *QUICK[:-1], "--metrics", "autointerp", "--llm-url", srv.url, "--llm-model", "judge",
                "--llm-key", "sk-secret-123", "--tokens", "16384"]  # fmt: skip (enough sequences for the windows)
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "calls to make" in err and "prompt tokens" in err
        first = srv.requests
        assert first > 0
        assert main(args) == 0  # a rerun: every answer from the cache
        assert srv.requests == first
    finally:
        srv.close()
    result = json.loads((target / "interp.json").read_text())
    ai = result["saes"][next(iter(result["saes"]))]["autointerp"]
    assert ai["calls_made"] == 0 and ai["latents_scored"] + ai["malformed"] + ai["latents_skipped"] == 6
    assert result["settings"]["llm"]["model"] == "judge" and "api_key" not in result["settings"]["llm"]
    cache = target / "interp_cache" / "autointerp.jsonl"
    assert len(cache.read_text().splitlines()) == first
    for path in target.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml"):
            assert "sk-secret-123" not in path.read_text()
