"""The circuit-tracer export (``e2edict export circuit-tracer``) read back by circuit-tracer: by
its own loader (``load_transcoder_set`` of circuit-tracer 0.5.0 from PyPI, in its own virtual
environment: its pins cannot share e2edict's) for ReLU, JumpReLU and BatchTopK transcoders with and
without skip paths, and by its current loader's reading reproduced from its source
(decoderesearch/circuit-tracer, ``single_layer_transcoder.py``: ``load_transcoder``,
``SingleLayerTranscoder.encode/decode``, ``activation_functions``), which adds TopK: the same
transcoder outputs as e2edict on the same inputs (1e-5, fp32); a trained run through the command
line; bad input refused in one line with nothing written."""

import subprocess

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ENV, ROOT, circuit_tracer_python, cli_cmd
from safetensors import safe_open

from e2edict.errors import E2EDictError
from e2edict.saes import registry
from e2edict.saes.base import Writes
from e2edict.saes.circuit_tracer_format import export_circuit_tracer


def circuit_tracer_forward(folder, layer: int, x: torch.Tensor) -> torch.Tensor:
    """What circuit-tracer computes from ``layer_{layer}.safetensors`` and ``config.yaml``."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    with safe_open(str(folder / f"layer_{layer}.safetensors"), framework="pt") as f:
        p = {k: f.get_tensor(k) for k in f.keys()}
    assert p["W_enc"].shape == p["W_dec"].shape == (p["b_enc"].shape[0], p["b_dec"].shape[0])  # [d_sae, d_model]
    pre = F.linear(x, p["W_enc"], p["b_enc"])
    if config.get("activation") == "relu":
        acts = F.relu(pre)
    elif config.get("activation") == "topk":
        gate = torch.zeros_like(pre).scatter_(-1, torch.topk(pre, k=config["k"], dim=-1).indices, 1)
        acts = pre * gate
    else:  # JumpReLU, its threshold loaded from the file
        acts = pre * (pre > p["activation_function.threshold"])
    out = acts @ p["W_dec"] + p["b_dec"]
    if "W_skip" in p:
        out = out + x @ p["W_skip"].T
    return out


def transcoders(arch: str, skip: bool = False, layers=range(4), d: int = 16, **kw) -> dict:
    torch.manual_seed(0)
    out = {}
    for layer in layers:
        writes = Writes(d, f"blocks.{layer}.hook_mlp_out", skip)
        sae = registry[arch](d, 64, f"blocks.{layer}.ln2.hook_normalized", writes=writes, **kw)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.1 * torch.randn_like(p))  # biases and a skip path away from zero
        out[sae.hook_name] = sae.eval()
    return out


@pytest.mark.parametrize(
    "arch, skip, kw",
    [("relu", False, {}), ("relu", True, {}), ("topk", False, {"k": 8}), ("jumprelu", True, {"init_threshold": 0.05}),
     ("batchtopk", False, {"k": 8})],
    ids=["relu", "relu-skip", "topk", "jumprelu-skip", "batchtopk"],
)  # fmt: skip
def test_circuit_tracer_reads_the_same_transcoders(tmp_path, arch, skip, kw):
    saes = transcoders(arch, skip, **kw)
    if arch == "batchtopk":  # its inference threshold, as training leaves one
        for sae in saes.values():
            sae.threshold.fill_(0.2)
    config = export_circuit_tracer(saes, "tiny", 4, tmp_path / "ct")
    assert config["feature_input_hook"] == "ln2.hook_normalized" and config["feature_output_hook"] == "hook_mlp_out"
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["config.yaml", *(f"layer_{i}.safetensors" for i in range(4))]
    x = torch.randn(50, 16)
    for layer, sae in enumerate(saes.values()):
        with torch.no_grad():
            torch.testing.assert_close(circuit_tracer_forward(tmp_path / "ct", layer, x), sae(x)[0], atol=1e-5, rtol=1e-5)


def test_a_trained_run_exports_through_the_command_line(tmp_path):
    run, out = tmp_path / "run", tmp_path / "ct"
    train = cli_cmd("train", ROOT / "configs/tiny/transcoders-e2e.yaml", "train.tokens=8192", "train.batch_size=8",
                    "train.warmup_tokens=0", "eval.tokens=1024", "eval.alive_tokens=1024", "--out", run, "--quiet")  # fmt: skip
    assert subprocess.run(train, env=ENV, capture_output=True, text=True, timeout=600).returncode == 0
    r = subprocess.run(cli_cmd("export", "circuit-tracer", run, "--out", out), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "all 4 layers" in r.stdout, r.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {"model_kind": "transcoder_set", "model_name": "tiny", "feature_input_hook": "ln2.hook_normalized",
                      "feature_output_hook": "hook_mlp_out", "activation": "relu"}  # fmt: skip
    import e2edict

    x = torch.randn(20, 128)
    for layer, sae in enumerate(e2edict.load_saes(run).values()):
        with torch.no_grad():
            torch.testing.assert_close(circuit_tracer_forward(out, layer, x), sae(x)[0], atol=1e-5, rtol=1e-5)
    r = subprocess.run(cli_cmd("export", "circuit-tracer", run, "--out", out), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "--overwrite replaces it" in r.stderr


@pytest.mark.parametrize(
    "saes, fragment",
    [
        (lambda: transcoders("relu", layers=range(3)), "none at layer 3"),
        (lambda: {h: s for h, s in transcoders("relu").items() if "blocks.1." not in h}, "none at layer 1"),
        (lambda: transcoders("batchtopk", k=8), "has a threshold <= 0"),  # no step taken: no inference threshold yet
        (lambda: {"blocks.0.hook_resid_pre": registry["relu"](16, 64, "blocks.0.hook_resid_pre")}, "an SAE, not a transcoder"),
    ],
    ids=["last-layer-missing", "a-layer-missing", "untrained-batchtopk", "an-sae"],
)  # fmt: skip
def test_what_circuit_tracer_cannot_take_is_refused_and_nothing_is_written(tmp_path, saes, fragment):
    with pytest.raises(E2EDictError, match=fragment) as e:
        export_circuit_tracer(saes(), "tiny", 4, tmp_path / "ct")
    assert "\n" not in str(e.value) and not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(E2EDictError, match="cannot write") as e:
        export_circuit_tracer(transcoders("relu"), "tiny", 4, blocker / "ct")
    assert "\n" not in str(e.value)


READ_WITH_CIRCUIT_TRACER = """
import sys, torch, yaml
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
folder, inputs, out = sys.argv[1:]
config = yaml.safe_load(open(f"{folder}/config.yaml"))
x = load_file(inputs)["x"]
n = len([1 for name in __import__("os").listdir(folder) if name.startswith("layer_")])
ts = load_transcoder_set({i: f"{folder}/layer_{i}.safetensors" for i in range(n)}, scan="e2edict",
                         feature_input_hook=config["feature_input_hook"], feature_output_hook=config["feature_output_hook"],
                         device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
with torch.no_grad():
    save_file({f"layer_{i}": ts[i](x).contiguous() for i in range(n)}, out)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, skip, kw",
    [("relu", True, {}), ("jumprelu", True, {"init_threshold": 0.05}), ("batchtopk", False, {"k": 8})],
    ids=["relu-skip", "jumprelu-skip", "batchtopk"],
)
def test_circuit_tracers_own_loader_reads_the_export(tmp_path, arch, skip, kw):
    from safetensors.torch import load_file, save_file

    saes = transcoders(arch, skip, **kw)
    if arch == "batchtopk":
        for sae in saes.values():
            sae.threshold.fill_(0.2)
    export_circuit_tracer(saes, "tiny", 4, tmp_path / "ct")
    x = torch.randn(30, 16)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "read.py"
    script.write_text(READ_WITH_CIRCUIT_TRACER)
    r = subprocess.run([str(circuit_tracer_python()), str(script), str(tmp_path / "ct"), str(tmp_path / "x.safetensors"),
                        str(tmp_path / "out.safetensors")], env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for layer, sae in enumerate(saes.values()):
        with torch.no_grad():
            torch.testing.assert_close(theirs[f"layer_{layer}"], sae(x)[0], atol=1e-5, rtol=1e-5)
