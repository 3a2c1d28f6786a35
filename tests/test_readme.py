"""The README is a tested document: every command in its ```bash blocks runs, in the README's order,
from a fresh folder, or, where it cannot run here (several processes or nodes, SLURM, a network,
the long default job), is composed and validated as the job would be before it starts.

- Runs: the recipes whose later steps read what earlier ones wrote (a smoke run and its report,
  export -> generate -> import -> train, dense -> upcycled, stop -> resume, the specialisation
  reports) and the planner, with small settings appended (see SMALL: a 2-layer model, 2 steps, the
  byte tokenizer, W&B disabled), one data cache for all.
- Checks (`train.check` in-process: compose with conf/, validate every setting, the process layout
  and the places it writes): every other command as written, with the number of processes its
  launcher would start (torchrun, launch/torchrun.sh, sbatch + launch/slurm.sbatch's #SBATCH lines);
  a sweep (`-m`) is checked combination by combination (with the SLURM launcher, with the processes
  of each of its jobs).
- A command this file does not know how to run or check fails the test: classify it here.
"""

from __future__ import annotations

import io
import itertools
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.jobs import REPO, job_env

README = REPO / "README.md"
# Run for real (with SMALL appended): the run names of the README's recipes.
RUN_NAMES = {"smoke", "mix", "long", "hf_demo", "from_hf", "dense", "upcycled"}
# Appended to every run of `python -m train` unless the command sets the key itself.
SMALL = {
    "model.n_layers": "2",
    "model.d_model": "64",
    "train.seq_len": "32",
    "train.micro_batch": "2",
    "train.eval_batches": "1",
    "train.log_interval": "1",
    "data.tokenizer.kind": "bytes",
    "data.num_proc": "1",
    "logging.wandb.mode": "disabled",
    "logging.progress_bar": "false",
    "logging.sample_tokens": "0",
}
# Replaced in every run, whatever the command says: the recipes keep their shape (stop, then resume).
FORCED = {"train.steps": "2", "train.stop_at": "1"}
# Commands that are neither run nor checked here, and why.
NOT_HERE = {
    "make test": "the test suite itself",
    "sudo make setup-slurm": "installs SLURM as root (tests/setup_slurm.sh, run by make test)",
    "sudo .venv/bin/python -m pytest tests/test_slurm.py -v": "the SLURM tests (tests/test_slurm.py)",
}
IN_PROCESS_TOOLS = ("train.plan",)


@dataclass
class Command:
    line: int  # in README.md
    text: str
    env: dict = field(default_factory=dict)
    argv: list = field(default_factory=list)
    substitutions: list = field(default_factory=list)  # the $(...) inside, in order


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of the ```bash blocks (continuation lines joined, comments dropped)."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.M | re.S):
        first = text[: block.start()].count("\n") + 2  # the block's first line
        pending, start = "", None
        for number, raw in enumerate(block.group(1).splitlines(), first):
            start = number if start is None else start
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            command, pending = (pending + raw).strip(), ""
            if command and not command.startswith("#"):
                commands.append(parse(start, command))
            start = None
    return commands


def parse(line: int, text: str) -> Command:
    """Tokens as a shell splits them; `NAME=value` prefixes are the environment; each `$(...)`
    becomes a token `__SUBSTi__` and its command is kept in `substitutions`."""
    substitutions = re.findall(r"\$\(([^)]*)\)", text)
    count = itertools.count()
    marked = re.sub(r"\$\([^)]*\)", lambda _: f"__SUBST{next(count)}__", text)
    tokens = shlex.split(marked, comments=True)
    words = " ".join(tokens)
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    return Command(line, words, env, tokens, substitutions)


def key_of(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def small(overrides: list[str]) -> list[str]:
    """The command's overrides with FORCED values replaced and SMALL appended where absent."""
    out = [f"{key_of(o)}={FORCED[key_of(o)]}" if key_of(o) in FORCED else o for o in overrides]
    present = {key_of(o) for o in out}
    out += [f"{k}={v}" for k, v in SMALL.items() if k not in present]
    if "train.steps" not in present:
        out.append(f"train.steps={FORCED['train.steps']}")
    return out


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic sweep: comma-separated values of a key -> every combination."""
    choices = [
        [f"{key_of(o)}={v}" for v in o.partition("=")[2].split(",")] if "," in o and "[" not in o else [o]
        for o in overrides
    ]
    return [list(c) for c in itertools.product(*choices)]


def sweep_processes(overrides: list[str]) -> int:
    """Processes of each job of a sweep: one with Hydra's basic launcher; nodes x tasks_per_node of
    conf/hydra/launcher/slurm.yaml (or its overrides) with the SLURM launcher."""
    if "hydra/launcher=slurm" not in overrides:
        return 1
    text = (REPO / "conf/hydra/launcher/slurm.yaml").read_text()
    options = dict(re.findall(r"^(nodes|tasks_per_node): (\d+)", text, re.M))
    for o in overrides:
        key, _, value = o.partition("=")
        if key in ("hydra.launcher.nodes", "hydra.launcher.tasks_per_node"):
            options[key.rsplit(".", 1)[1]] = value
    return int(options["nodes"]) * int(options["tasks_per_node"])


def sbatch_processes(argv: list[str], env: dict) -> int:
    """Processes `sbatch [options] launch/slurm.sbatch` starts: nodes x processes per node, from the
    sbatch options, else the script's #SBATCH lines; SWITCHYARD_PROCS_PER_NODE, else GPUs per node."""
    script = argv.index("launch/slurm.sbatch")
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (REPO / "launch/slurm.sbatch").read_text(), re.M))
    options.update(o[2:].partition("=")[::2] for o in argv[1:script] if o.startswith("--"))
    per_node = int(env.get("SWITCHYARD_PROCS_PER_NODE") or options.get("gpus-per-node") or 1)
    assert per_node >= 1, f"{argv}: no process per node (set SWITCHYARD_PROCS_PER_NODE on CPU nodes)"
    return int(options.get("nodes", 1)) * per_node


@pytest.fixture
def fresh_layout(tmp_path, data_cache, monkeypatch):
    """A folder as a newcomer's checkout root: the README's relative paths (corpus/, outputs/, hf/) live there."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("It was the best of times, it was the worst of times.\n" * 40)
    (corpus / "b.jsonl").write_text(
        "".join(f'{{"text": "row {i}: the quick brown fox jumps over the lazy dog."}}\n' for i in range(40))
    )
    rows = [
        f'{{"text": "{"to be or not to be, " * 8}", "source": "plays"}}\n',
        f'{{"text": "{"in the beginning was the word, " * 8}", "source": "scripture"}}\n',
    ]
    # interleaved, so that the validation split (the last 1% of the rows) holds both domains, 3 rows each
    (corpus / "mix.jsonl").write_text("".join(rows[i % 2] for i in range(600)))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer.train_from_iterator(
        ["to be or not to be"] * 20,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer.save(str(corpus / "tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWITCHYARD_CACHE", str(data_cache))
    return tmp_path


def run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def check(overrides: list[str], nproc: int) -> None:
    from train.check import check_job, compose_job

    check_job(compose_job(overrides), nproc)


def test_every_readme_command_runs_or_checks(fresh_layout, data_cache):
    env = {**job_env(data_cache), "OMP_NUM_THREADS": "1"}
    handled = []
    for cmd in readme_commands():
        argv, where = cmd.argv, f"README.md line {cmd.line}: {cmd.text}"
        if cmd.text in NOT_HERE:
            handled.append(("not here", cmd.text))
            continue
        for i, inner in enumerate(cmd.substitutions):  # $(python -m train.import_hf ...): its output, spliced in
            done = run(shlex.split(inner), fresh_layout, env)
            assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"
            at = argv.index(f"__SUBST{i}__")
            argv = argv[:at] + shlex.split(done.stdout) + argv[at + 1 :]
        if argv[:2] == ["make", "train"]:
            check(argv[2:], 1)
        elif argv[0] in ("python", ".venv/bin/python") and argv[1] == "-m" and argv[2] == "train":
            overrides = argv[3:]
            if "-m" in overrides:
                nproc = sweep_processes(overrides)
                for job in expand_sweep([o for o in overrides if o != "-m"]):
                    check(job, nproc)
            elif any(o in {f"run_name={name}" for name in RUN_NAMES} for o in overrides):
                done = run(["python", "-m", "train", *small(overrides)], fresh_layout, env)
                assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"
                assert "Traceback" not in done.stderr, f"{where}\n{done.stderr[-3000:]}"
            else:
                check(overrides, 1)
        elif argv[0] == "python" and argv[1] == "-m" and argv[2] in IN_PROCESS_TOOLS:
            from train.plan import main as plan_main

            out = io.StringIO()
            with redirect_stdout(out):
                assert plan_main(argv[3:]) == 0, where
            assert out.getvalue().strip(), where
        elif argv[0] == "python" and argv[1] == "-m" and argv[2].startswith("train."):
            done = run(argv, fresh_layout, env)
            assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"
        elif argv[0] == "launch/torchrun.sh":
            check(argv[2:], int(argv[1]))
        elif argv[0] == "torchrun":
            launcher = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--") and "=" in a)
            nproc = int(launcher.get("nnodes", 1)) * int(launcher["nproc_per_node"])
            check(argv[argv.index("train") + 1 :], nproc)
        elif argv[0] == "sbatch":
            check(argv[argv.index("launch/slurm.sbatch") + 1 :], sbatch_processes(argv, cmd.env))
        else:
            pytest.fail(f"{where}: tests/test_readme.py does not know how to run or check this command: classify it")
        handled.append(("ok", cmd.text))
    assert len(handled) > 30  # the README's blocks were found
    # what the recipes wrote: the export, its import, the upcycled run, the reports
    assert (fresh_layout / "hf/hf_demo/model.safetensors").is_file()
    assert (fresh_layout / "outputs/from_hf/checkpoints/latest").is_file()
    assert (fresh_layout / "outputs/upcycled/checkpoints/latest").is_file()
    assert (fresh_layout / "outputs/smoke/plots/loss.png").is_file()
    assert (fresh_layout / "outputs/mix/specialization/specialization.md").is_file()


def test_readme_commands_are_parsed_as_a_shell_would():
    text = (
        "\n".join(
            [
                "```bash",
                "python -m train run_name=a 'data.paths=[x.txt]'   # a comment",
                "# a comment line",
                "SWITCHYARD_PROCS_PER_NODE=1 sbatch --nodes=2 launch/slurm.sbatch run_name=b",
                "python -m train.plan a=1 \\",
                "  b=2",
                "python -m train run_name=c $(python -m train.import_hf hf/x)  # spliced",
                "```",
            ]
        )
        + "\n"
    )
    got = readme_commands(text)
    assert [c.argv for c in got] == [
        ["python", "-m", "train", "run_name=a", "data.paths=[x.txt]"],
        ["sbatch", "--nodes=2", "launch/slurm.sbatch", "run_name=b"],
        ["python", "-m", "train.plan", "a=1", "b=2"],
        ["python", "-m", "train", "run_name=c", "__SUBST0__"],
    ]
    assert got[1].env == {"SWITCHYARD_PROCS_PER_NODE": "1"}
    assert got[3].substitutions == ["python -m train.import_hf hf/x"]
    assert sbatch_processes(got[1].argv, got[1].env) == 2
    assert sbatch_processes(["sbatch", "launch/slurm.sbatch"], {}) == 16  # the script's 2 nodes x 8 GPUs
    assert small(["run_name=x", "train.steps=50", "train.stop_at=200", "model.d_model=128"]) == [
        "run_name=x",
        "train.steps=2",
        "train.stop_at=1",
        "model.d_model=128",
        *(f"{k}={v}" for k, v in SMALL.items() if k != "model.d_model"),
    ]
    assert expand_sweep(["moe.num_experts=4,8", "moe.top_k=1,2", "'x=[a,b]'"])[:2] == [
        ["moe.num_experts=4", "moe.top_k=1", "'x=[a,b]'"],
        ["moe.num_experts=4", "moe.top_k=2", "'x=[a,b]'"],
    ]
