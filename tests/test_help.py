"""Help generated from the typed schema (train/help.py): every setting has a meaning, its allowed
values are those validate() enforces, the README's table is the generated one, and every entry
point's --help is Switchyard's."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from train import help as schema_help
from train.config import JobConfig
from train.plan import PlanConfig

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("check", "plan", "report", "specialization", "generate", "export_hf", "import_hf", "help")


@dataclass
class _Example:
    plain: int = 1  # a trailing comment
    # a comment above,
    # on two lines
    both: str = "x"  # and one after
    bare: float = 0.5
    # not attached: a blank line is between

    nullable: Optional[int] = None


def test_field_comments_are_read_from_the_source():
    assert schema_help.field_comments(_Example) == {
        "plain": "a trailing comment",
        "both": "a comment above, on two lines and one after",
        "bare": "",
        "nullable": "",
    }


def test_every_setting_has_a_meaning():
    missing = [s.key for s in schema_help.all_settings() if not s.meaning]
    missing += [s.key for s in schema_help.all_settings(schema_help.settings(PlanConfig, "plan.")) if not s.meaning]
    assert not missing, f"settings without a help comment in the schema (add a trailing # comment): {missing}"


def test_settings_follow_the_schema_groups_and_the_composed_defaults():
    groups = schema_help.settings()
    keys = [s.key for s in schema_help.all_settings(groups)]

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = cls.__dataclass_fields__[f.name].type
            sub = getattr(cls(), f.name)
            if dataclasses.is_dataclass(sub):
                yield from leaves(type(sub), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", hint

    assert sorted(keys) == sorted(k for k, _ in leaves(JobConfig))
    assert [g for g, _, _ in groups][:4] == ["", "model", "model.rope_scaling", "moe"]
    by_key = {s.key: s for s in schema_help.all_settings(groups)}
    assert by_key["moe.top_k"].default == "2"
    assert by_key["model.max_seq_len"].default == "same as train.seq_len"  # conf/config.yaml's interpolation
    assert by_key["data.cache_dir"].default == "$SWITCHYARD_CACHE or ~/.cache/switchyard"
    assert by_key["train.stop_at"].type == "int or null"


def test_allowed_values_come_from_the_validation_code():
    from models.config import SCORE_FUNCTIONS
    from train.config import DTYPES

    allowed = schema_help.allowed_values()
    assert allowed["moe.score"] == "one of " + ", ".join(SCORE_FUNCTIONS)
    assert allowed["train.dtype"] == "one of " + ", ".join(DTYPES)
    assert allowed["deepspeed.zero_stage"] == "one of 0, 1, 2, 3"
    assert allowed["train.steps"] == "integer 1 … 2^40"  # a literal loop over names, MAX_STEPS = 2**40
    assert allowed["moe.top_k"] == "integer 1 … moe.num_experts"
    assert allowed["moe.jitter"] == "number in [0, 1)"
    assert allowed["train.seed"] == "integer 0 … 2^63-1"
    assert allowed["plan.bytes_per_param"] == "one of 2, 4"


@pytest.mark.parametrize("setting", [s.key for s in schema_help.all_settings() if s.allowed.startswith("one of")])
def test_a_value_outside_the_listed_choices_is_refused(setting, tmp_path):
    """The help's choices and validate() agree: a value the help does not list is refused, naming the setting."""
    job = JobConfig(run_dir=str(tmp_path / "run"))
    job.data.cache_dir = str(tmp_path / "cache")
    *parents, name = setting.split(".")
    node = job
    for part in parents:
        node = getattr(node, part)
    setattr(node, name, "not-a-choice" if isinstance(getattr(node, name), str) else 99)
    with pytest.raises(ValueError, match=rf"^{setting} must be one of"):
        job.validate()


def test_readme_table_is_the_generated_one():
    table = schema_help.readme_table((ROOT / "README.md").read_text())
    assert table is not None, "README.md lost the settings table's markers"
    assert table == schema_help.render_markdown(), (
        "README.md's settings table is out of date: run `python -m train.help --write-readme`"
    )


def test_write_readme_replaces_only_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{schema_help.BEGIN}\n| stale |\n{schema_help.END}\nafter\n")
    assert schema_help.write_readme(readme)
    text = readme.read_text()
    assert text.startswith(f"before\n{schema_help.BEGIN}\n| setting |") and text.endswith(f"{schema_help.END}\nafter\n")
    assert schema_help.readme_table(text) == schema_help.render_markdown()
    assert not schema_help.write_readme(readme)  # a second run changes nothing


def _tool_help(tool: str, capsys) -> str:
    module = __import__(f"train.{tool}", fromlist=["main"])
    try:
        code = module.main(["--help"])
    except SystemExit as stop:  # argparse's help exits
        code = stop.code
    out = capsys.readouterr().out
    assert code in (0, None), out
    return out


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tool_explains_itself(tool, capsys):
    out = _tool_help(tool, capsys)
    assert out.startswith(f"usage: python -m train.{tool}")
    if tool in ("check", "plan"):  # they take the job's overrides: every setting is listed
        for s in schema_help.all_settings():
            assert f"  {s.key}={s.default}  (" in out
    if tool == "plan":
        assert "plan.device_memory_gb=80.0  (float; number > 0)" in out
    if tool == "generate":  # defaults are shown, also falsy ones
        assert " ".join(out.split()).count("(default: ") == 5 and "text (default: 0)" in " ".join(out.split())
    # every option of an argparse tool has a meaning
    blank = [line for line in out.splitlines() if line.startswith("  -") and len(line.split()) == 1]
    assert not blank, blank


def test_python_m_train_help_is_switchyards_not_hydras():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "train", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "powered by Hydra" not in done.stdout and done.stderr == ""
    assert done.stdout == schema_help.job_help()
    assert "moe.top_k=2  (int; integer 1 … moe.num_experts)\n      experts each token is sent to" in done.stdout
    assert "model=mixtral_8x7b|olmoe_1b_7b|qwen1_5_moe_a2_7b|qwen3_30b_a3b|small|tiny" in done.stdout  # the YAML groups


def test_check_says_what_it_checked(tmp_path, capsys):
    from train.check import main

    overrides = [f"hydra.run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", "parallel.ep=2"]
    assert main(["--nproc", "4", *overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("switchyard: ok: 3 override(s) composed") and out.count("\n") == 1
    assert "4 process(es), parallel.ep=2" in out and f"run directory {tmp_path}/run" in out
    assert main(["--quiet", "--nproc", "4", *overrides]) == 0
    assert capsys.readouterr().out == ""
