"""tunelab eval --perturb: a seeded perturbed copy of the data scored beside the clean data, with the drop,
in the printed report, the -o JSON and a chart."""

import json

from tunelab import cli


def test_eval_reports_clean_perturbed_and_the_drop(ner_run, conll_dir, tmp_path, capsys):
    src, _ = ner_run
    data = str(conll_dir / "test.conll")
    out, plot, md = tmp_path / "m.json", tmp_path / "plots" / "r.png", tmp_path / "r.md"
    argv = ["eval", str(src), "--data", data, "--perturb", "char_noise=1,mentions=1", "--perturb-intensity", "1",
            "-o", str(out), "--plot", str(plot), "--report", str(md)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc) == {"clean", "perturbed", "drop", "perturb"}
    assert doc["perturb"] == {"operations": {"char_noise": 1.0, "mentions": 1.0}, "intensity": 1.0, "seed": 0}
    assert doc["drop"] == doc["clean"]["main"] - doc["perturbed"]["main"]
    assert doc["clean"]["main"] > 0 and doc["perturbed"]["main"] != doc["clean"]["main"]
    assert "== perturbed (char_noise=1,mentions=1" in printed and "main score drops by" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = md.read_text()
    main_row = f"| **entity micro-F1** | {doc['clean']['main'] * 100:.2f} | {doc['perturbed']['main'] * 100:.2f} | " \
               f"{doc['drop'] * 100:.2f} |"
    assert main_row in report and "char_noise 1, mentions 1; intensity 1; seed 0" in report
    for name, v in doc["clean"]["per_type"].items():  # one row per entity type
        assert f"| {name} F1 | {v['f1'] * 100:.2f} |" in report
    assert "![clean vs perturbed](plots/r.png)" in report

    # the clean score is what plain eval gives, and the same seed gives the same perturbed score
    assert cli.main(["eval", str(src), "--data", data, "-o", str(tmp_path / "plain.json")]) == 0
    assert json.loads((tmp_path / "plain.json").read_text()) == doc["clean"]
    assert cli.main(argv[:-6] + ["-o", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["perturbed"] == doc["perturbed"]
    capsys.readouterr()


def test_bad_perturb_options_stop_before_any_work(ner_run, conll_dir, capsys):
    src, _ = ner_run
    data = str(conll_dir / "test.conll")
    for extra, words in ((["--perturb", "typos=0.1"], "write OP=P with OP one of char_noise"),
                         (["--perturb", "char_noise=2"], "a probability in (0, 1]"),
                         (["--perturb", "case=0.1", "--plot", "x.svg"], "PNG"),
                         (["--perturb", "case=0.1", "--report", "x.html"], "Markdown"),
                         (["--plot", "x.png"], "add --perturb"),
                         (["--perturb", "case=0.1", "--perturb-intensity", "0"], "must be in (0, 1]")):
        assert cli.main(["eval", str(src), "--data", data, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
