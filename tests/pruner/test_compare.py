"""`e3pruner compare` on a tiny model: every method, one table, resume, bad input."""

import json

import pytest

import e3pruner.compare as compare
from e3pruner.cli import main
from e3pruner.compare import CompareArgs, parse_methods, run_compare
from e3pruner.methods import available_methods
from e3pruner.pipeline import PruneError
from tests.pruner.tiny_models import tiny_model_dir


def _args(tmp_path, model_dir, train, held, **kw):
    base = dict(methods=",".join(available_methods()), model=str(model_dir), data=str(train),
                heldout=str(held), block_len=32, batch_size=2, calib_blocks=4,
                search_tokens=32 * 2 * 6, recovery_tokens=32 * 2 * 3, eval_tokens=600,
                eval_ctx=64, tasks="arc_easy,boolq", zeroshot_limit=3, population=4,
                generations=1, operator="classic", out=str(tmp_path / "cmp"), progress=False,
                prune_layers=2, amp="none", heldout_extra=None)
    base.update(kw)
    return CompareArgs(**base)


def test_every_method_one_table_and_resume(tmp_path, monkeypatch):
    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    args = _args(tmp_path, model_dir, train, held)
    report = run_compare(args, log=lambda *_: None)
    names = available_methods()
    assert list(report["methods"]) == names
    for name, m in report["methods"].items():
        if name == "self-pruner-width":
            assert m["removed_layers"] is None and len(m["width_rates"]) == 6
            assert m["ppl_after_recovery"] is None and "not exported" in m["note"]
        else:
            assert len(m["removed_layers"]) == 2
            assert 0 < m["calib_kd_of_mask"] < float("inf")  # the search objective column
            assert m["ppl_after_recovery"] > 1 and m["tokens"]["recovery"] == 192
        assert m["ppl_before_recovery"] > 1
        assert set(m["zeroshot"]) >= {"arc_easy", "boolq", "average"}
        assert m["zeroshot"]["arc_easy"]["n"] == 3
    assert report["methods"]["clp"]["recovery_scope"] == "endpoints"
    assert report["methods"]["e3"]["recovery_scope"] == "full"
    run = tmp_path / "cmp"
    table = (run / "compare.md").read_text()
    for name in names:
        assert f"| {name}" in table
    assert "teacher (unpruned)" in table and "ARC-E" in table and "BoolQ" in table
    assert "| calib KD |" in table and "LLM / fallback ops" in table
    # the same mask scores the same: methods that removed the same layers agree
    by_mask = {}
    for m in report["methods"].values():
        if m["removed_layers"] is not None:
            kd = by_mask.setdefault(tuple(m["removed_layers"]), m["calib_kd_of_mask"])
            assert kd == m["calib_kd_of_mask"]
    assert "--prune-layers 2" in table  # the reproducing command
    assert json.loads((run / "compare.json").read_text())["methods"].keys() == report["methods"].keys()
    assert (run / "removed_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: every step is stored, so nothing runs again and the table is the same
    def no_rerun(*_a, **_k):
        raise AssertionError("a finished method ran again")

    monkeypatch.setattr(compare, "method_config", no_rerun)
    again = run_compare(_args(tmp_path, model_dir, train, held, resume=True), log=lambda *_: None)
    for name in names:
        assert again["methods"][name]["ppl_after_recovery"] == report["methods"][name]["ppl_after_recovery"]
    # wall time adds up over invocations (state.json), not only this one's
    assert report["invocations"] == 1
    assert report["seconds_all_invocations"] == pytest.approx(report["seconds_this_invocation"])
    assert again["invocations"] == 2
    assert again["seconds_all_invocations"] == pytest.approx(
        report["seconds_all_invocations"] + again["seconds_this_invocation"], rel=1e-6)
    assert "of the 2 invocations recorded in state.json" in (run / "compare.md").read_text()
    with pytest.raises(PruneError, match="different settings"):
        run_compare(_args(tmp_path, model_dir, train, held, resume=True, recovery_tokens=128))

    # other zero-shot settings on resume: only the zero-shot columns are evaluated again, on
    # the students restored from their final recovery checkpoints (no search, no training)
    import e3pruner.recovery.distill as distill

    def no_training(*_a, **_k):
        raise AssertionError("recovery trained again")

    monkeypatch.setattr(distill.torch.optim.AdamW, "step", no_training)
    more = run_compare(_args(tmp_path, model_dir, train, held, resume=True, zeroshot_limit=4),
                       log=lambda *_: None)
    for name in names:
        m, old = more["methods"][name], report["methods"][name]
        assert m["zeroshot"]["arc_easy"]["n"] == 4
        assert m["ppl_after_recovery"] == old["ppl_after_recovery"]
        assert m["search_seconds"] == old["search_seconds"]
    assert more["teacher"]["zeroshot"]["arc_easy"]["n"] == 4
    monkeypatch.undo()
    fresh = run_compare(_args(tmp_path, model_dir, train, held, zeroshot_limit=4,
                              out=str(tmp_path / "fresh")), log=lambda *_: None)
    for name in names:
        assert more["methods"][name]["zeroshot"]["average"] == pytest.approx(
            fresh["methods"][name]["zeroshot"]["average"])


def test_bad_input_fails_before_work(tmp_path):
    model_dir, train, held = tiny_model_dir(tmp_path, "qwen3")
    with pytest.raises(PruneError, match="available"):
        parse_methods("e3,nope")
    with pytest.raises(PruneError, match="twice"):
        parse_methods("e3,e3")
    cases = [({"tasks": "arc_easy,mmlu"}, "mmlu"), ({"prune_layers": 6}, "prune-layers"),
             ({"search_tokens": 10}, "search-tokens"), ({"population": 1}, "population")]
    for kw, msg in cases:
        with pytest.raises((PruneError, ValueError), match=msg):
            run_compare(_args(tmp_path, model_dir, train, held, **kw))
    assert not (tmp_path / "cmp" / "state.json").exists()


def test_cli_compare_small(tmp_path, capsys):
    model_dir, train, held = tiny_model_dir(tmp_path, "qwen3")
    rc = main(["compare", "--methods", "shortgpt,angular", "--model", str(model_dir),
               "--data", str(train), "--heldout", str(held), "--block-len", "32",
               "--batch-size", "2", "--search-tokens", "64", "--recovery-tokens", "128",
               "--eval-tokens", "600", "--eval-ctx", "64", "--zeroshot-limit", "0",
               "--prune-layers", "2", "--out", str(tmp_path / "c"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| shortgpt |" in out and "| angular |" in out and "ARC-E" not in out
    rc = main(["compare", "--methods", "bogus", "--model", str(model_dir), "--out", str(tmp_path / "d")])
    assert rc == 2 and "available" in capsys.readouterr().err


def test_seeds_error_bars_second_heldout_and_paired_tests(tmp_path, monkeypatch):
    model_dir, train, held = tiny_model_dir(tmp_path, "qwen3")
    kw = dict(methods="e3,shortgpt,angular", seeds=2, heldout_extra=str(train),
              tasks="arc_easy", zeroshot_limit=6, search_tokens=32 * 2 * 4)
    report = run_compare(_args(tmp_path, model_dir, train, held, **kw), log=lambda *_: None)
    assert report["seeds"] == [0, 1] and report["heldout"]["texts"] == [str(held), str(train)]
    for name, m in report["methods"].items():
        assert list(m["per_seed"]) == ["0", "1"] and len(m["removed_layers_per_seed"]) == 2
        after = m["heldout"][str(held)]["after"]
        assert after["n"] == 2 and after["std"] is not None
        assert after["mean"] == pytest.approx(sum(after["values"]) / 2)
        assert after["values"] == [m["per_seed"][s]["ppl_after"][str(held)] for s in ("0", "1")]
        assert m["heldout"][str(train)]["after"]["mean"] > 1
        assert 0 < m["mask_stability"]["share_modal"] <= 1
        assert m["zeroshot"]["arc_easy"]["n"] == 6 and m["zeroshot"]["arc_easy"]["stderr"] >= 0
    # the seeds differ in their data order, so the recovered models differ
    e3 = report["methods"]["e3"]["heldout"][str(held)]["after"]["values"]
    assert e3[0] != e3[1]
    vs = report["methods"]["shortgpt"]["vs_e3"]
    for key in (f"ppl_after:{held}", f"ppl_before:{train}", "zeroshot_items", "seeds_sign_test"):
        assert key in vs
    d = vs[f"ppl_after:{held}"]
    assert d["ppl_ratio_ci"][0] <= d["ppl_ratio"] <= d["ppl_ratio_ci"][1]
    assert d["verdict"] in ("a<b", "a>b", "tie") and "vs_e3" not in report["methods"]["e3"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "±" in table and "same mask over seeds" in table and "[95% CI]" in table
    assert "--seeds 2" in table and report["cpu"] in table

    # one more seed on resume: only its rows run
    import e3pruner.compare as cmp_mod

    ran = []
    real = cmp_mod.method_config

    def counting(name, args):
        ran.append((name, args.seed))
        return real(name, args)

    monkeypatch.setattr(cmp_mod, "method_config", counting)
    more = run_compare(_args(tmp_path, model_dir, train, held, resume=True, **{**kw, "seeds": 3}),
                       log=lambda *_: None)
    assert sorted(ran) == [("angular", 2), ("e3", 2), ("shortgpt", 2)]
    assert more["methods"]["e3"]["heldout"][str(held)]["after"]["values"][:2] == e3
