"""``radguard evaluate`` and ``radguard reader-study``: thin wrappers over
:mod:`radguard.evaluation`."""

from __future__ import annotations

import click

__all__ = ["evaluate", "reader_study"]


@click.command()
@click.argument("predictions", type=click.Path(dir_okay=False))
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="Labels CSV (id, label) when the predictions carry no label column.")
@click.option("--id-column", help="Column naming each case in the predictions and labels "
                                  "[default: id, or file where there is no id column].")
@click.option("--positive", help="The label value that is positive (e.g. pneumonia) when "
                                 "labels are text; 0/1 labels need none.")
@click.option("--by", default="", help="Comma-separated columns for subgroup analysis.")
@click.option("--compare", "compare_path", type=click.Path(dir_okay=False),
              help="Predictions of an external site, compared at the same threshold.")
@click.option("--compare-labels", "compare_labels_path", type=click.Path(dir_okay=False),
              help="Labels CSV for the --compare predictions (same --id-column, --positive).")
@click.option("--threshold", type=float, help="Operating threshold (default: Youden's J).")
@click.option("--bootstrap", is_flag=True, help="Also give a stratified bootstrap AUC CI.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Write the self-contained HTML report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary.")
def evaluate(predictions: str, labels_path: str | None, id_column: str | None,
             positive: str | None, by: str, compare_path: str | None,
             compare_labels_path: str | None, threshold: float | None, bootstrap: bool,
             out_path: str | None, as_json: bool) -> None:
    """AUC with DeLong CIs, metrics at a threshold, calibration, subgroups, external sites."""
    from radguard.evaluation.report import evaluate as run
    from radguard.evaluation.report import format_p, read_predictions, to_json, write_report

    if compare_labels_path and not compare_path:
        raise click.UsageError("--compare-labels goes with --compare")
    preds = read_predictions(predictions, labels_path, id_column=id_column, positive=positive)
    other = read_predictions(compare_path, compare_labels_path, id_column=id_column,
                             positive=positive) if compare_path else None
    columns = [c.strip() for c in by.split(",") if c.strip()]
    result = run(preds, threshold=threshold, by=columns, compare=other, bootstrap=bootstrap)
    if out_path:
        write_report(result, out_path)
    if as_json:
        click.echo(to_json(result))
        return
    auc = result["auc"]
    at = result["at_threshold"]
    click.echo(f"{result['cases']} cases, {result['positives']} positive")
    click.echo(f"AUC {auc['auc']:.3f} (95% CI {auc['low']:.3f}-{auc['high']:.3f}, DeLong)")
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        ci = at[name]
        click.echo(f"{name:<12} {ci['value']:.3f} ({ci['low']:.3f}-{ci['high']:.3f}) at "
                   f"threshold {result['threshold']:.4g}")
    if other is not None:
        d = result["external"]["auc_difference"]
        click.echo(f"external AUC change {-d['difference']:+.3f} "
                   f"({-d['high']:+.3f} to {-d['low']:+.3f}), {format_p(d['p_value'])}")
    if out_path:
        click.echo(f"report: {out_path}")


# -- reader-study -------------------------------------------------------------------------

@click.group("reader-study")
def reader_study() -> None:
    """Multi-reader multi-case (MRMC) ROC reader studies."""


@reader_study.command("analyze")
@click.argument("ratings", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Write a self-contained HTML report (per-reader AUC plot) here.")
@click.option("--reference", help="Modality every difference is taken against "
                                  "(default: the first one in the CSV).")
@click.option("--method", type=click.Choice(["jackknife", "delong"]), default="jackknife",
              show_default=True, help="Covariance estimate of the reader AUCs (ORH).")
@click.option("--analysis", type=click.Choice(["orh", "dbm"]), default="orh",
              show_default=True, help="Obuchowski-Rockette-Hillis or Dorfman-Berbaum-Metz.")
@click.option("--design", type=click.Choice(["rrrc", "frrc", "rrfc"]), default="rrrc",
              show_default=True, help="Generalisation summarised in the JSON: random "
                                      "readers and cases, fixed readers, or fixed cases.")
def reader_study_analyze(ratings: str, as_json: bool, html_path: str | None,
                         reference: str | None, method: str, analysis: str,
                         design: str) -> None:
    """Compare modalities in a fully crossed reader study (CSV columns reader, modality,
    case, truth, rating): empirical AUC, ORH or DBM with Hillis ddf."""
    from radguard.evaluation import mrmc

    result = mrmc.analyze(mrmc.read_ratings(ratings), method=method, analysis=analysis,
                          reference=reference, design=design)
    if html_path:
        mrmc.write_html(result, html_path)
    click.echo(mrmc.to_json(result) if as_json else mrmc.format_table(result))
    if html_path and not as_json:
        click.echo(f"report: {html_path}")


