"""The GPU kit rehearsed on CPU: benchmarks/gpu/run_all.sh --cpu-rehearsal runs every step of the
lent-GPU script with the repo's environment, the CUDA steps skipped, so that a lent machine's 15
minutes are never spent on a typo. Also the torch API probe on this machine's torch."""

import json
import os
import subprocess
import sys

from tests.jobs import REPO

KIT = REPO / "benchmarks" / "gpu"
STAGE1 = [
    "install",
    "probe_torch_api",
    "grouped_mm_vs_loop",
    "peak",
    "zero0_train",
    "zero0_resume",
    "zero0_sample",
    "zero3_full_ac",
    "grad_accum2",
    "sync_count",
    "sync_count_accum2",
    "moe_layer",
]
STAGE2 = ["build_megablocks", "megablocks_vs_loop", "moe_layer_megablocks", "megablocks_train"]
NEEDS_CUDA = {"grouped_mm_vs_loop", *STAGE2}


def test_probe_finds_every_torch_api_here():
    done = subprocess.run(
        [sys.executable, str(KIT / "probe_torch_api.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ok      torch ") and "MISSING" not in done.stdout
    assert len([line for line in lines[1:-1] if line.startswith("ok ")]) >= 20


def test_cpu_rehearsal_runs_every_step(tmp_path, data_cache):
    out = tmp_path / "out"  # as the device tool's $OUT: what comes back from a lent machine
    out.mkdir()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "KIT_DIR": str(tmp_path / "kit"),
        "OUT": str(out),
        "SWITCHYARD_CACHE": str(data_cache),
    }
    done = subprocess.run(
        ["bash", str(KIT / "run_all.sh"), "--cpu-rehearsal"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    kit = tmp_path / "kit"
    status = dict(line.split("\t")[:2] for line in (kit / "status.tsv").read_text().splitlines())
    assert list(status) == STAGE1 + STAGE2
    for step, verdict in status.items():
        expected = "skipped: needs CUDA" if step in NEEDS_CUDA else ("skipped" if step == "install" else "ok")
        log = kit / f"{step}.log"
        assert verdict.startswith(expected), (step, verdict, log.read_text()[-2000:] if log.exists() else "")

    probe = json.loads((kit / "probe_torch_api.json").read_text())
    assert probe["version_ok"] and all(c["ok"] for c in probe["checks"])
    assert "resumed from step 2" in (kit / "zero0_resume.log").read_text()
    assert (kit / "zero0_sample.log").read_text().startswith("ROMEO:")
    records = [json.loads(line) for line in (kit / "runs" / "zero0" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4 and any("samples/text" in r for r in records)
    layer = json.loads((kit / "moe_layer.json").read_text())
    assert layer["rehearsal"] and len(layer["rows"]) == 6 and not any("error" in r for r in layer["rows"])
    sync = json.loads((kit / "sync_count_accum2.json").read_text())
    assert sync["grad_accum"] == 2 and sync["moe_layers"] == 2

    back = sorted(p.name for p in out.iterdir())  # the device tool takes back at most 8 files
    assert back == ["kit_stage1.tar.gz", "kit_stage2.tar.gz", "status.tsv", "summary.md"]
    assert "| zero3_full_ac | ok |" in (out / "summary.md").read_text()
