"""The report's figures and index page on degenerate inputs (a tiny run: no class or site reaches fid.min_count)."""
from __future__ import annotations

import numpy as np

from medi import figures, report


def fid_metrics(per_site: dict) -> dict:
    return {"n_per_class": {"LUAD": {"real": 6, "generated": 1}, "LUSC": {"real": 6, "generated": 1}},
            "per_class": {}, "below_min_count": {"class": {"LUAD": {"fid": 310.5}, "LUSC": {"fid": 280.0}}},
            "mean_class_fid": None, "per_site": per_site, "n_per_site": {s: {"real": 3} for s in per_site},
            "min_count": 2, "extractor": "inception-v3-compat", "n_generated": 2, "n_real": 12,
            "sampling": {"strategy": "match", "scheduler": "ddim", "steps": 2, "guidance": 1.0},
            "overall": 5.1e-12, "kid": 7.5e-15,
            "conditioning": {"class_accuracy": 0.5, "site_accuracy": 0.0, "class_accuracy_real_cv": 0.611,
                             "site_accuracy_real_cv": 0.111, "class_chance": 0.5, "site_chance": 0.25}}


def test_fid_figure_draws_when_no_site_reaches_min_count():
    """A tiny or heavily filtered run has no per-site FID; the figure still draws (it used to fail on log scale)."""
    fig = figures.fid_figure({"cls": fid_metrics({}), "medi": fid_metrics({})})
    ax, ax2 = fig.axes
    assert [b.get_height() for b in ax.patches] == [310.5, 280.0, 310.5, 280.0] and ax2.get_xscale() == "linear"
    fig = figures.fid_figure({"cls": fid_metrics({"05": 120.0}), "medi": fid_metrics({"05": 90.0})})
    assert fig.axes[1].get_xscale() == "log" and np.isfinite(fig.axes[1].get_xlim()).all()


def test_index_page_without_a_mean_class_fid(make_cfg):
    page = report.index_page(make_cfg(), {"cls": fid_metrics({}), "medi": fid_metrics({})}, {}, None, {})
    assert "| cls | 5.1e-12 | - | 7.5e-15 | 0.500 | 0.000 | - |" in page


def test_the_index_page_says_what_it_cannot_show(make_cfg):
    """Every class and site below fid.min_count, a class without any FID, no FID curve: one sentence each."""
    tiny = fid_metrics({})
    tiny["n_per_class"]["UCS"] = {"real": 1, "generated": 0}
    page = report.index_page(make_cfg(train__eval_every=0), {"cls": tiny, "medi": fid_metrics({})}, {}, None, {})
    section = page.split("### What these figures cannot show\n\n")[1].split("\n\n")[0].splitlines()
    assert section == [
        "- cls: no class has 2 (fid.min_count) real and generated images (at most 6 real and 1 generated, LUAD), so "
        "there is no mean FID per class; the bars are hatched, from fewer images.",
        "- cls: no FID bar for UCS (fewer than 2 real or generated images).",
        "- medi: no class has 2 (fid.min_count) real and generated images (at most 6 real and 1 generated, LUAD), so "
        "there is no mean FID per class; the bars are hatched, from fewer images.",
        "- FID per site (right panel): no site has 2 (fid.min_count) real and generated images, so the panel is empty.",
        "- FID curves during training: train.eval_every is 0, so none was computed."]
    assert "cannot show" not in report.index_page(make_cfg(), {"cls": {**fid_metrics({"05": 1.0}), "per_class": {
        "LUAD": 3.0, "LUSC": 4.0}, "mean_class_fid": 3.5}}, {}, None, {})


def test_the_index_page_puts_each_model_beside_the_ground_truth_on_unseen_pairs(make_cfg):
    pairs = {"pairs_per_kind": {"seen": 7, "unseen": 42}, "images_per_pair": 4}
    cls = {**fid_metrics({}), "pairs": {**pairs, "unseen_site_accuracy": 0.042, "unseen_class_accuracy": 0.5,
                                        "seen_site_accuracy": 0.179, "seen_class_accuracy": 0.5}}
    truth = {f"ceiling_{k}_{f}": v for k, v in (("unseen", 0.11), ("seen", 0.09))
             for f in ("site_accuracy", "stain_rank", "class_accuracy")}
    medi = {**fid_metrics({}), "pairs": {**pairs, "unseen_site_accuracy": 0.143, "unseen_stain_rank": 0.276,
                                         "unseen_class_accuracy": 0.488, "seen_site_accuracy": 0.643,
                                         "seen_stain_rank": 0.159, "seen_class_accuracy": 0.786, **truth}}
    page = report.index_page(make_cfg(), {"cls": cls, "medi": medi}, {}, None, {})
    assert "42 unseen, 7 seen pairs, 4 images each" in page
    assert "| cls | 0.042 | - | 0.500 | 0.179 | - | 0.500 |" in page            # a figure missing (real data: no stain rank): -
    assert "| medi | 0.143 | 0.276 | 0.488 | 0.643 | 0.159 | 0.786 |" in page
    assert "| ground truth | 0.110 | 0.110 | 0.110 | 0.090 | 0.090 | 0.090 |" in page
    assert "Pairs never seen" not in report.index_page(make_cfg(), {"cls": fid_metrics({})}, {}, None, {})
