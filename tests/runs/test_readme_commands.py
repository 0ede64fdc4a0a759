"""Every shell command of the README's Use section runs as written (so the README cannot drift),
in a fresh folder holding copies of the configs with small token counts, after the demo script
(whose two runs `compare` reads). The commands that need what a fresh clone does not have are
given it first: text files for `tokenize`, a reference checkpoint for `import-e2e-sae`."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ENV, ROOT, cli_cmd

# tested elsewhere at full size, and too long for a check of the README's wording: a 13-run grid
SKIPPED = {"sweep": "tests/test_sweep.py"}
SMALL = {"tokens": 4096, "batch_size": 8, "warmup_tokens": 0, "eval_every_tokens": None, "log_every": 4}


def _use_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    use = text[text.index("## Use") :]
    block = re.search(r"```bash\n(.*?)```", use, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip().startswith("e2edict ")]


def _small_configs(dst: Path) -> None:
    shutil.copytree(ROOT / "configs", dst / "configs")
    for path in (dst / "configs").rglob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        if isinstance(cfg, dict) and "train" in cfg:
            cfg["train"].update(SMALL)
            cfg.setdefault("eval", {}).update({"tokens": 2048, "alive_tokens": 2048})
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.slow
def test_every_use_command_of_the_readme_runs(tmp_path):
    from support import reference_checkpoint

    _small_configs(tmp_path)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    (tmp_path / "books").mkdir()
    corpus = (ROOT / "src/e2edict/assets/tiny/README.md").read_text()
    for i in range(2):
        (tmp_path / "books" / f"b{i}.txt").write_text(corpus * 20)
    reference_checkpoint(tmp_path)  # samples_400000.pt and final_config.yaml
    env = {**ENV, "PATH": f"{Path(cli_cmd()[0]).parent}:{ENV.get('PATH', '')}"}
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    ran = []
    for line in _use_commands():
        args = shlex.split(line)[1:]
        if args[0] in SKIPPED:
            continue
        r = subprocess.run(cli_cmd(*args, "--quiet") if _takes_quiet(args) else cli_cmd(*args), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
        ran.append(args[0])
    assert {"hooks", "tokenize", "train", "eval", "compare", "report", "import-e2e-sae", "interp", "plan", "export"} <= set(ran)
    assert (tmp_path / "out/runs/tiny-e2e/interp.json").is_file()
    assert (tmp_path / "out/runs/tiny-e2e/report/index.html").is_file()
    assert (tmp_path / "out/runs/tiny-e2e+architecture-matryoshka_batchtopk+k-32+coeff-0/eval.json").is_file()
    assert (tmp_path / "data/books/manifest.json").is_file() and (tmp_path / "out/compare").is_dir()
    assert (tmp_path / "out/ct/layer_3.safetensors").is_file()


def _takes_quiet(args: list[str]) -> bool:
    return args[0] in ("train", "eval", "report", "sweep", "interp")
