"""`python -m rlkd.demo` plumbing on tiny local models: every step runs through the real CLI, the outputs land where
the demo says, the figures it prints are the ones `rlkd inspect --student` measured, and a second run skips what is
done. (The real-teacher run is `make demo`; it takes minutes, so it is not a unit test.)"""

from __future__ import annotations

import json

from rlkd import demo


def _short_dolly(path, n: int):
    """Dolly-shaped rows short enough for the tiny models' 512 positions (the shipped sample's are not)."""
    words = "the cat sat on a mat while two dogs ran past and one bird sang".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Say something about item {i}.", "context": "",
                                "response": " ".join(words[j % len(words)] for j in range(i, i + 12)),
                                "category": "open_qa"}) + "\n")
    return path


def test_demo_end_to_end_then_resume(tmp_path, tiny_teacher_dir, capsys):
    data = _short_dolly(tmp_path / "dolly.jsonl", 16)
    cfg = demo.DemoConfig(dir=tmp_path / "demo", teacher=str(tiny_teacher_dir), data=str(data), rows=14,
                          dev_rows=4, layers="0",
                          max_length=128, steps=2, batch_size=2, sample=40, engine="hf", dev_engine="hf",
                          top_k=10, save_every=1)
    res = demo.run_demo(cfg)
    d = cfg.dir
    out = capsys.readouterr().out

    # The held-out rows are the last dev_rows of the data and never reach the training cache.
    assert len((d / "train.jsonl").read_text().splitlines()) == 10
    assert len((d / "dev.jsonl").read_text().splitlines()) == 4
    assert json.loads((d / "cache-train" / "manifest.json").read_text())["rows"] == 10
    assert json.loads((d / "cache-dev" / "manifest.json").read_text())["rows"] == 4
    # The student keeps one of the teacher's two layers and was trained for exactly `steps` steps.
    assert json.loads((d / "student-init" / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((d / "student-rlkd" / "final" / "rlkd_train.json").read_text())["step"] == 2
    assert (d / "report.html").stat().st_size > 1000
    # The printed before/after figures are the ones inspect wrote, on the held-out cache.
    before = json.loads((d / "before.json").read_text())["student"]
    after = json.loads((d / "after.json").read_text())["student"]
    assert before["student"].endswith("student-init") and after["student"].endswith("final")
    b, a = before["metrics"]["response"], after["metrics"]["response"]
    assert res["before"] == b and res["after"] == a
    assert f"{b['kd']:>9.4f}{a['kd']:>9.4f}" in out
    for cmd in ("rlkd cache-teacher", "rlkd make-student", "rlkd train-student", "rlkd inspect"):
        assert f"$ {cmd}" in out

    # Second run: nothing is redone but the cheap cache summary.
    stamps = {p: p.stat().st_mtime for p in (d / "before.json", d / "after.json",
                                             d / "student-rlkd" / "final" / "rlkd_train.json",
                                             d / "cache-train" / "manifest.json")}
    res2 = demo.run_demo(cfg)
    out2 = capsys.readouterr().out
    assert out2.count("already done, skipped") == 6  # 2 caches, student, before, training, after
    for cmd in ("rlkd cache-teacher", "rlkd make-student", "rlkd train-student"):
        assert f"$ {cmd}" not in out2
    assert {p: p.stat().st_mtime for p in stamps} == stamps
    assert res2["after"] == a
