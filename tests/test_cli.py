"""The `workbench` command: demo, measure, report, and errors as one clear line."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def workbench(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env)


def check_self_contained(html: str) -> None:
    # plotly.js inlined exactly once, nothing fetched from the network
    assert len(re.findall(r"plotly\.js v\d", html)) == 1
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)
    assert "sliders" in html and "frames" in html


@pytest.mark.slow
def test_demo_quick_writes_a_self_contained_report(tmp_path, quick_run):
    out = tmp_path / "report.html"
    res = workbench("demo", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"report: {out.resolve()}"
    html = out.read_text()
    check_self_contained(html)
    for title in ("Training and test accuracy", "Routing statistics", "Influence of training documents",
                  "lean on training documents with the same answer"):
        assert title in html
    # a second demo reuses the run and the store: nothing is trained or measured again
    parts = sorted(p.stat().st_mtime_ns for p in (quick_run.root / "store").rglob("step_*.parquet"))
    res = workbench("demo", "--quick", "--out", str(out))
    assert res.returncode == 0
    assert sorted(p.stat().st_mtime_ns for p in (quick_run.root / "store").rglob("step_*.parquet")) == parts
    assert "training" not in res.stderr


def test_measure_and_report_on_a_run_folder(tiny_run, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(tiny_run.root, folder, ignore=shutil.ignore_patterns("store", "report.html"))
    res = workbench("measure", str(folder), "--probe", "basic")
    assert res.returncode == 0, res.stderr
    assert (folder / "store" / "basic").is_dir()
    res = workbench("report", str(folder))
    assert res.returncode == 0, res.stderr
    check_self_contained((folder / "report.html").read_text())


def test_errors_are_one_clear_line(tmp_path):
    res = workbench("measure", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.startswith("workbench: NoCheckpointsError: no checkpoints in")
    assert "Traceback" not in res.stderr
    res = workbench("measure", str(tmp_path), "--probe", "nonsense")
    assert res.returncode == 2


# --- a user's own checkpoints ------------------------------------------------------------------------------------
WORDS = ("[PAD] [BOS] [EOS] [UNK] the cat sat on a mat dog ran to red blue green one two three is what color of sky "
         "grass").split()


def _word_tokenizer():
    """A word-level tokenizer inside the tiny models' vocabulary, saved like a real one (tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
                                   pad_token="[PAD]")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*experts got no document token")  # three documents route to few experts
def test_measure_and_report_user_checkpoints_with_a_samples_file(tmp_path, capsys):
    """A folder of HF checkpoints with its tokenizer, samples from JSONL, documents from Parquet and queries from
    CSV: every default probe and influence measured from the command line, resumed, reported."""
    import json

    import polars as pl
    import torch
    import torch.nn.functional as F

    from tests.tiny_models import save_series
    from workbench import Run
    from workbench.cli import main

    ckpts = save_series("olmoe", tmp_path / "ckpts", steps=(0, 100))
    tok = _word_tokenizer()
    tok.save_pretrained(ckpts / "step_0")  # the first checkpoint's folder holds the tokenizer
    texts = [f"on a mat sat the {a} {c}" for a in ("cat", "dog", "sky", "grass") for c in ("red", "blue", "green")]
    texts += ["the sky is blue", "grass is green", "what color is the sky", "one two three"]
    rows = [{"text": t, "group": "train" if i < 12 else "test"} for i, t in enumerate(texts)]
    rows += [{"id": "q1", "prompt": "the color of the sky is", "completion": "blue", "group": "test"}]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["measure", str(ckpts), "--samples", str(samples)]) == 0
    run = Run.from_folder(ckpts)
    assert set(run.store.probes()) == {"basic", "routing", "pathways", "calibration", "probes", "representations",
                                       "coherence"}
    # both new families on an HF MoE series: coherence of each group and the control, layouts with decoded texts
    coh = run.store.table("coherence").filter((pl.col("metric") == "m_coherence") & pl.col("layer").is_null()
                                              & pl.col("module").is_null())
    assert set(coh.select("group", "labels").unique().rows()) == {("train", "true"), ("test", "true"),
                                                                  ("train", "random"), ("all", "true")}
    assert coh["step"].unique().sort().to_list() == [0, 100]
    emb = run.store.table("representations", final=True).filter(pl.col("metric") == "embedding")
    assert emb["step"].unique().sort().to_list() == [0, 100] and any(
        "on a mat sat the cat red" in t for t in emb["text"].to_list())
    # the stored losses are the model's own: a text scores every next token, a prompt only its completion
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpts / "step_100").eval()
    basic = run.store.table("basic").filter((pl.col("step") == 100) & (pl.col("metric") == "loss"))
    stored = dict(basic.drop_nulls("sample_id").select("sample_id", "value").iter_rows())
    with torch.no_grad():
        ids = torch.tensor([tok(texts[1])["input_ids"]])
        want = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
        prompt = tok("the color of the sky is")["input_ids"]
        full = torch.tensor([prompt + tok("blue", add_special_tokens=False)["input_ids"]])
        want_q = F.cross_entropy(model(full).logits[0, len(prompt) - 1:-1], full[0, len(prompt):])
    assert stored["1"] == pytest.approx(float(want), rel=1e-5)
    assert stored["q1"] == pytest.approx(float(want_q), rel=1e-5)
    # the samples are kept with the run; other samples are refused rather than mixed into the same tables
    assert main(["measure", str(ckpts), "--probe", "basic"]) == 0
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "the cat ran"}))
    assert main(["measure", str(ckpts), "--samples", str(tmp_path / "other.jsonl"), "--probe", "basic"]) == 2
    assert "other samples" in capsys.readouterr().err

    # influence: documents from Parquet, queries from CSV, the tokenizer given explicitly
    pl.DataFrame({"id": ["d0", "d1", "d2"], "text": texts[:3]}).write_parquet(tmp_path / "docs.parquet")
    pl.DataFrame({"id": ["q0", "q1"], "prompt": ["the cat", "the sky is"], "completion": ["sat", "blue"]}).write_csv(
        tmp_path / "queries.csv")
    args = ["measure", str(ckpts), "--probe", "influence", "--documents", str(tmp_path / "docs.parquet"),
            "--queries", str(tmp_path / "queries.csv"), "--tokenizer", str(ckpts / "step_0"), "--step", "100",
            "--option", "top_k_tokens=1"]
    assert main(args) == 0
    scores = run.store.table("influence").filter(pl.col("metric") == "score")
    assert scores.height == 2 * 3 and scores["step"].unique().to_list() == [100]
    queries = pl.read_parquet(run.store.root / "influence" / "queries.parquet")
    assert queries["prompt"].to_list() == ["the cat", "the sky is"] and queries["tokens"][1][-1] == "blue"
    part = run.store.root / "influence" / "step_000100.parquet"
    mtime = part.stat().st_mtime_ns
    assert main(args) == 0 and part.stat().st_mtime_ns == mtime  # resumed: nothing measured again
    assert main(args + ["--option", "strategy=kfac"]) == 2
    assert "other options" in capsys.readouterr().err
    assert main(["measure", str(ckpts), "--queries", str(tmp_path / "queries.csv"), "--probe", "basic"]) == 2

    assert main(["report", str(ckpts)]) == 0
    html = (ckpts / "report.html").read_text()
    check_self_contained(html)
    for title in ("Training and test accuracy", "Routing pathways", "Calibration and discrimination",
                  "Influence of training documents"):
        assert title in html
