"""CLI for governance: ``radguard dataset ...``, ``radguard deid``, ``radguard audit ...``,
``radguard audit-archive``. Registered on the main group by :mod:`radguard.cli`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from radguard.cli.common import _progress, _read_passphrase, _workers_option


def _audit_log(path: str | None):
    from radguard.governance.auditlog import AuditLog

    return AuditLog(path)


_audit_option = click.option(
    "--audit-log", "audit_path", type=click.Path(dir_okay=False), default=None,
    help="Audit log to append to (default $RADGUARD_AUDIT_LOG or ~/.radguard/audit.jsonl).")


def _signer(key: str | None, cert: str | None, passphrase_file: str | None):
    if not key and not cert:
        return None
    if not (key and cert):
        raise click.UsageError("--key and --cert go together")
    from radguard.provenance.keys import load_signer

    return load_signer(key, cert, _read_passphrase(passphrase_file))


# -- dataset ------------------------------------------------------------------------------------

@click.group()
def dataset() -> None:
    """Versioned datasets: snapshot, diff, verify, audit."""


@dataset.command("snapshot")
@click.argument("folder", type=click.Path())
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="CSV of labels, one row per image.")
@click.option("--label-key", help="Label column naming the image (default file/path/image or "
                                  "the first column).")
@click.option("--parent", "parent_path", type=click.Path(dir_okay=False),
              help="Manifest of the previous version.")
@click.option("--out", "-o", "out_path", type=click.Path(),
              help="Manifest file or folder (default ./NAME-VERSION.manifest.json).")
@click.option("--key", type=click.Path(dir_okay=False), help="Sign with this radguard key...")
@click.option("--cert", type=click.Path(dir_okay=False), help="...and its certificate.")
@click.option("--passphrase-file", type=click.Path(dir_okay=False))
@_workers_option
@_audit_option
def dataset_snapshot(folder: str, labels_path: str | None, label_key: str | None,
                     parent_path: str | None, out_path: str | None, key: str | None,
                     cert: str | None, passphrase_file: str | None, workers: int,
                     audit_path: str | None) -> None:
    """Write a content-addressed manifest of FOLDER and its labels."""
    from radguard.governance.datasets import (
        default_manifest_path,
        image_files,
        load_manifest,
        snapshot,
    )

    signer = _signer(key, cert, passphrase_file)
    parent = load_manifest(parent_path) if parent_path else None
    log = _audit_log(audit_path)
    total = len(image_files(folder))
    with _progress(total, "hashing") as bar:
        task = bar.add_task("hash", total=total)
        manifest = snapshot(folder, labels_path, label_key=label_key, parent=parent,
                            actor=log.actor, workers=workers,
                            progress=lambda n: bar.advance(task, n))
    if signer is not None:
        manifest.sign(signer)
    out = Path(out_path) if out_path else default_manifest_path(manifest)
    if out.is_dir():
        out = default_manifest_path(manifest, out)
    manifest.save(out)
    log.append("dataset.snapshot", str(Path(folder).resolve()),
               {"version": manifest.dataset_hash, "images": len(manifest.images),
                "unreadable": len(manifest.unreadable), "manifest": str(out),
                "signed": bool(signer)})
    click.echo(f"version {manifest.version}: {len(manifest.images)} images, "
               f"{len(manifest.labels)} label rows -> {out}")
    for rel, why in sorted(manifest.unreadable.items()):
        click.echo(f"  unreadable: {rel}: {why}")
    for rel in manifest.labels_without_image[:10]:
        click.echo(f"  label row without an image: {rel}")


@dataset.command("diff")
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_audit_option
def dataset_diff(old: str, new: str, as_json: bool, audit_path: str | None) -> None:
    """Added, removed, moved, modified and relabelled images from OLD to NEW (manifests).
    Exits 1 when they differ."""
    from radguard.governance.datasets import diff_manifests, load_manifest

    d = diff_manifests(load_manifest(old), load_manifest(new))
    _audit_log(audit_path).append("dataset.diff", f"{d.old} {d.new}",
                                  {"identical": d.identical})
    if as_json:
        click.echo(json.dumps(d.to_dict(), indent=1))
    else:
        click.echo("\n".join(d.summary()))
    sys.exit(0 if d.identical else 1)


@dataset.command("verify")
@click.argument("manifest_path", type=click.Path(dir_okay=False))
@click.option("--folder", type=click.Path(), help="Re-hash this folder against the manifest "
                                                  "(default: the folder it was made from).")
@click.option("--trust", "trust_paths", multiple=True, type=click.Path(),
              help="CA or signer certificates the manifest's signer must chain to.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="Re-read this label CSV against the manifest (default: the file it was "
                   "made from).")
@click.option("--no-rehash", is_flag=True, help="Only check the manifest itself.")
@_workers_option
@_audit_option
def dataset_verify(manifest_path: str, folder: str | None, trust_paths: tuple[str, ...],
                   labels_path: str | None, no_rehash: bool, workers: int,
                   audit_path: str | None) -> None:
    """Check a manifest (hash, signature, trust) and that the data still matches it: the
    images and the label rows (each changed row is listed). Exits 1 when they differ."""
    import os

    from radguard.governance.datasets import diff_manifests, load_manifest, snapshot

    m = load_manifest(manifest_path)
    click.echo(f"manifest {m.version}: content matches its hash")
    if m.signature:
        from radguard.provenance.trust import TrustStore

        trust = TrustStore.from_paths(trust_paths) if trust_paths else None
        who = m.check_signature(trust)
        click.echo(f"signed by {who}" + (" (trusted)" if trust else " (trust not checked)"))
    ok = True
    if not no_rehash:
        labels = labels_path or m.labels_file or None
        unchecked = None
        if labels and not labels_path and not Path(labels).is_file():
            from radguard.governance.datasets import DatasetError

            raise DatasetError(f"{labels}: the label file the manifest was made from is gone "
                               "(give --labels FILE)")
        if m.labels and labels is None:
            unchecked = ("label rows not re-read: the manifest predates recording its label "
                         "file (give --labels FILE)")
            import tempfile

            from radguard.fileio import write_csv

            # rebuild the label CSV from the manifest: only the images are re-read
            fd, labels = tempfile.mkstemp(suffix=".csv")
            os.close(fd)
            write_csv(labels, (v["row"] for v in m.labels.values()), m.label_columns)
        try:
            now = snapshot(folder or m.root, labels, label_key=m.label_key, workers=workers)
        finally:
            if unchecked and labels:
                Path(labels).unlink(missing_ok=True)
        d = diff_manifests(m, now)
        ok = d.identical
        where = f"images under {now.root}" + (f", labels from {labels}" if labels and
                                               not unchecked else "")
        if ok:
            click.echo(f"{'images match' if unchecked else 'data matches'} the manifest "
                       f"({where})")
        else:
            click.echo(f"DATA DIFFERS from the manifest ({where}):")
            click.echo("\n".join(d.summary()[1:]))
        if unchecked:
            click.echo(f"note: {unchecked}")
    _audit_log(audit_path).append("dataset.verify", m.dataset_hash, {"ok": ok})
    sys.exit(0 if ok else 1)


@dataset.command("audit")
@click.argument("folder", type=click.Path())
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="CSV of labels (label, patient and split columns are found by name).")
@click.option("--label-key", help="Label column naming the image (default file/path/image).")
@click.option("--label-col", help="Column with the class label (default label/class/target).")
@click.option("--patient-col", help="Column with the patient ID (default patient_id/...).")
@click.option("--split-col", help="Column with the split (default split/set/subset/fold).")
@click.option("--model", "model_name", help="Triage model whose features judge labels (e.g. "
                                            "chest); default: image thumbnails.")
@click.option("--against", type=click.Path(file_okay=False),
              help="Folder of the previous version, for distribution-shift tests.")
@click.option("--no-synthetic", is_flag=True, help="Skip the synthetic-image detector.")
@click.option("--trust", "trust_paths", multiple=True, type=click.Path(),
              help="CA certificates DICOM signatures must chain to.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              default="dataset-audit.html", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              default="dataset-audit.json", show_default=True)
@_workers_option
@_audit_option
def dataset_audit(folder: str, labels_path: str | None, label_key: str | None,
                  label_col: str | None, patient_col: str | None, split_col: str | None,
                  model_name: str | None, against: str | None, no_synthetic: bool,
                  trust_paths: tuple[str, ...], html_path: str, json_path: str, workers: int,
                  audit_path: str | None) -> None:
    """Poisoning and quality audit: duplicates, conflicting labels, label-flip suspects,
    split leakage, synthetic and unsigned images, shift. Exits 1 when anything is found."""
    from radguard.governance.audit import audit_dataset
    from radguard.governance.datasets import image_files

    model = None
    if model_name:
        from radguard.triage.model import load_model

        model = load_model(model_name)
    trust = None
    if trust_paths:
        from radguard.provenance.trust import TrustStore

        trust = TrustStore.from_paths(trust_paths)
    total = len(image_files(folder))
    with _progress(total, "auditing") as bar:
        task = bar.add_task("audit", total=total)
        report = audit_dataset(folder, labels_path, label_col=label_col,
                               patient_col=patient_col, split_col=split_col,
                               label_key=label_key, model=model, synthetic=not no_synthetic,
                               trust=trust, against=against, workers=workers,
                               progress=lambda n: bar.advance(task, n))
    report.write_json(json_path)
    report.write_html(html_path)
    _audit_log(audit_path).append("dataset.audit", report.root,
                                  {"images": report.images, "summary": report.summary})
    click.echo(f"{report.images} images audited")
    for key, count in report.summary.items():
        click.echo(f"  {key.replace('_', ' ')}: {count}")
    for note in report.not_checked:
        click.echo(f"  not checked: {note}")
    click.echo(f"report: {html_path}  summary: {json_path}")
    sys.exit(1 if any(v for k, v in report.summary.items()) else 0)


@dataset.group("adjudicate")
def dataset_adjudicate() -> None:
    """Label adjudication: worklist for the adjudicator, then final labels and agreement."""


_rule_options = [
    click.option("--rule", type=click.Choice(["disagreement", "all-positive", "all"]),
                 default="disagreement", show_default=True,
                 help="Cases sent to the adjudicator (ties always are)."),
    click.option("--positive", help="The positive label, for --rule all-positive."),
]


def _with_rule(func):  # noqa: ANN001
    for option in reversed(_rule_options):
        func = option(func)
    return func


@dataset_adjudicate.command("plan")
@click.argument("readers", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Worklist CSV for the adjudicator (fills the label column).")
@_with_rule
@click.option("--blind", is_flag=True, help="Leave reader names out of the worklist.")
def dataset_adjudicate_plan(readers: str, out_path: str, rule: str, positive: str | None,
                            blind: bool) -> None:
    """Write the adjudication worklist of READERS (CSV: case, reader, label)."""
    from radguard.governance.adjudication import plan

    work = plan(readers, rule, positive, blind=blind)
    work.write(out_path)
    click.echo(f"{len(work.rows)} case(s) for the adjudicator (rule {rule}"
               f"{', blinded' if blind else ''}) -> {out_path}")


@dataset_adjudicate.command("resolve")
@click.argument("readers", type=click.Path(dir_okay=False))
@click.argument("adjudicated", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Adjudicated labels CSV (file,label; the parent's layout with --parent).")
@_with_rule
@click.option("--allow-new-labels", is_flag=True,
              help="Accept adjudicated labels no reader used.")
@click.option("--label-column", default="label", show_default=True,
              help="Column of the parent's labels that adjudication sets.")
@click.option("--snapshot", "snapshot_folder", type=click.Path(file_okay=False),
              help="Snapshot this folder with the adjudicated labels as a new version.")
@click.option("--parent", "parent_path", type=click.Path(dir_okay=False),
              help="Manifest of the unadjudicated version (required with --snapshot).")
@click.option("--manifest", "manifest_path", type=click.Path(),
              help="Where the new manifest goes (default ./NAME-VERSION.manifest.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
@_workers_option
@_audit_option
def dataset_adjudicate_resolve(readers: str, adjudicated: str, out_path: str, rule: str,
                               positive: str | None, allow_new_labels: bool,
                               label_column: str, snapshot_folder: str | None,
                               parent_path: str | None, manifest_path: str | None,
                               as_json: bool, workers: int, audit_path: str | None) -> None:
    """Final labels from READERS and the ADJUDICATED worklist: the adjudicator's where given,
    the majority elsewhere; agreement report; optionally a new dataset version."""
    from radguard.governance.adjudication import (
        AdjudicationError,
        adjudicated_snapshot,
        resolve,
    )
    from radguard.governance.datasets import default_manifest_path, load_manifest

    if snapshot_folder and not parent_path:
        raise AdjudicationError("--snapshot needs --parent, the manifest of the "
                                "unadjudicated version (the provenance of the new labels)")
    parent = load_manifest(parent_path) if parent_path else None
    res = resolve(readers, adjudicated, rule, positive, allow_new_labels=allow_new_labels)
    log = _audit_log(audit_path)
    details: dict[str, object] = {
        "rule": rule, "cases": len(res.study.cases), "readers": res.study.readers,
        "sent": len(res.sent), "adjudicated": len(res.adjudicated),
        "changed": [c["case"] for c in res.changed], "labels": str(out_path)}
    manifest = None
    if snapshot_folder and parent is not None:
        from radguard.governance.datasets import image_files

        total = len(image_files(snapshot_folder))
        with _progress(total, "hashing") as bar:
            task = bar.add_task("hash", total=total)
            manifest = adjudicated_snapshot(res, snapshot_folder, parent, out_path,
                                            label_column=label_column, actor=log.actor,
                                            workers=workers,
                                            progress=lambda n: bar.advance(task, n))
        out = Path(manifest_path) if manifest_path else default_manifest_path(manifest)
        if out.is_dir():
            out = default_manifest_path(manifest, out)
        manifest.save(out)
        details |= {"version": manifest.dataset_hash, "parent": parent.dataset_hash,
                    "manifest": str(out)}
    else:
        res.write_labels(out_path, parent, label_column)
    log.append("dataset.adjudicate", str(Path(readers).resolve()), details)
    if as_json:
        report = res.to_dict() | {"labels": str(out_path)}
        if manifest is not None:
            report |= {"version": manifest.version, "parent": parent.version,
                       "manifest": details["manifest"]}
        click.echo(json.dumps(report, indent=1))
        return
    click.echo("\n".join(res.summary()))
    click.echo(f"adjudicated labels -> {out_path}")
    if manifest is not None:
        click.echo(f"version {manifest.version} (parent {parent.version}): "
                   f"{len(manifest.images)} images, {len(manifest.labels)} label rows -> "
                   f"{details['manifest']}")


# -- de-identification -----------------------------------------------------------------------

def _region(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: a region is x,y,width,height in pixels") from exc
    return x, y, w, h


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder; files are named by their new SOP Instance UID.")
@click.option("--options", "options_text", default="",
              help="Profile options, comma-separated: retain-dates, modified-dates, "
                   "retain-uids, retain-device, retain-institution, retain-patient-chars, "
                   "clean-descriptors, clean-structured.")
@click.option("--pseudonym-key", type=click.Path(dir_okay=False),
              help="Key file for consistent pseudonyms and UIDs across runs (created).")
@click.option("--blank", "regions", multiple=True,
              help="Black out burned-in text: x,y,width,height (repeatable).")
@click.option("--key", type=click.Path(dir_okay=False), help="Re-sign with this radguard key...")
@click.option("--cert", type=click.Path(dir_okay=False), help="...and its certificate.")
@click.option("--passphrase-file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input.")
@_audit_option
def deid(inputs: tuple[str, ...], out: str, options_text: str, pseudonym_key: str | None,
         regions: tuple[str, ...], key: str | None, cert: str | None,
         passphrase_file: str | None, as_json: bool, audit_path: str | None) -> None:
    """De-identify DICOM files (PS3.15 Annex E Basic Profile with options), optionally
    re-signing them. Compressed images with --blank are re-encoded losslessly in their own
    transfer syntax where possible, else written uncompressed (said per file). A bad file is
    reported and skipped; exits 1 if any input failed or needs a look for burned-in text, 2
    if none could be de-identified."""
    from radguard.dicom.io import iter_dicom_paths
    from radguard.governance.deid import (
        Deidentifier,
        DeidOptions,
        deidentify_file,
    )
    from radguard.governance.deid import (
        pseudonym_key as read_pseudonym_key,
    )

    options = DeidOptions.parse(options_text)
    signer = _signer(key, cert, passphrase_file)
    secret, note = read_pseudonym_key(pseudonym_key)
    tool = Deidentifier(secret, options, blank_regions=[_region(r) for r in regions])
    paths = list(iter_dicom_paths(inputs))
    if not paths:
        raise click.UsageError("no DICOM files among the inputs")
    failed = flagged = 0
    written: dict[Path, Path] = {}  # output -> the input that made it
    with _progress(len(paths), "de-identifying") as bar:
        task = bar.add_task("deid", total=len(paths))
        for path in paths:
            try:
                dst, report = deidentify_file(path, out, tool, signer=signer)
            except Exception as exc:  # one bad file must not stop the batch
                if isinstance(exc, KeyboardInterrupt | MemoryError):
                    raise
                failed += 1
                row = {"input": str(path), "error": _deid_error(path, exc)}
            else:
                flagged += bool(report.warnings)
                if written.setdefault(dst, path) != path:
                    report.notes.append(f"same SOP Instance as {written[dst]}: one output")
                row = {"input": str(path), "output": str(dst), **report.to_dict()}
            bar.advance(task)
            if as_json:
                click.echo(json.dumps(row))
            elif "error" in row:
                click.echo(f"FAILED {row['error']}")  # the reason starts with the path
            else:
                click.echo(f"{path} -> {row['output']}")
                for warning in row["warnings"]:
                    click.echo(f"  warning: {warning}")
                for remark in row["notes"]:
                    click.echo(f"  note: {remark}")
    _audit_log(audit_path).append("deid", out, {
        "inputs": len(paths), "failed": failed, "burned_in_warnings": flagged,
        "options": options.enabled(), "signed": bool(signer), "regions": list(regions)})
    if not as_json:
        click.echo(f"{len(paths) - failed} of {len(paths)} de-identified; {note}")
    # like sign: 2 when nothing could be done, 1 when some files failed or need a look
    sys.exit(2 if failed == len(paths) else 1 if failed or flagged else 0)


def _deid_error(path: Path, exc: Exception) -> str:
    """One line for a file that could not be de-identified (nothing was written for it)."""
    import os

    from radguard.errors import RadguardError

    if os.environ.get("RADGUARD_DEBUG") and not isinstance(exc, RadguardError | OSError):
        raise exc
    if isinstance(exc, RadguardError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = exc.strerror or str(exc)
        name = exc.filename2 if exc.filename2 is not None else exc.filename
        text = f"{name}: {text}" if name is not None else text
    else:
        text = f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return text if text.startswith(str(path)) else f"{path}: {text}"


# -- audit log ------------------------------------------------------------------------------------

@click.group()
def audit() -> None:
    """The hash-chained audit log: verify it, show its head, list entries."""


def _chain(log_path: str | None, db_url: str | None):
    """The log file, or the chain in the database gateways sharing one keep."""
    if not db_url:
        return _audit_log(log_path)
    if log_path:
        raise click.UsageError("--log and --db-url name two different logs: give one")
    from radguard.governance.auditlog import DatabaseAuditLog

    return DatabaseAuditLog(db_url)


_db_url_option = click.option(
    "--db-url", envvar="RADGUARD_AUDIT_DB_URL", default=None, metavar="URL",
    help="The audit chain in PostgreSQL that several gateways share (their db_url, "
         "postgresql://...; or $RADGUARD_AUDIT_DB_URL, which keeps the password off the "
         "command line), instead of a log file.")


@audit.command("verify")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="Log file (default $RADGUARD_AUDIT_LOG or ~/.radguard/audit.jsonl).")
@_db_url_option
@click.option("--expect-head", help="Head hash kept elsewhere; the log must end there.")
@click.option("--new", "new", is_flag=True,
              help="Nothing was ever logged here: a missing or empty log without a head file "
                   "is then not an error (by default it is: deleting both hides everything).")
@click.option("--json", "as_json", is_flag=True)
def audit_verify(log_path: str | None, db_url: str | None, expect_head: str | None, new: bool,
                 as_json: bool) -> None:
    """Detect any edit, deletion, insertion, reordering or truncation, and a deleted log.
    Exits 1 if found."""
    report = _chain(log_path, db_url).verify(expect_head, new=new)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        state = "intact" if report.intact else "MISSING" if report.missing else "TAMPERED"
        click.echo(f"{report.path}: {state}, {report.entries} entries, head {report.head}")
        for problem in report.problems:
            click.echo(f"  {problem}")
    sys.exit(0 if report.intact else 1)


@audit.command("head")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None)
@_db_url_option
def audit_head(log_path: str | None, db_url: str | None) -> None:
    """Print the head hash, to keep somewhere an attacker on this machine cannot reach."""
    head = _chain(log_path, db_url).head()
    click.echo(f"{head['head']} ({head['entries']} entries)")


@audit.command("show")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None)
@click.option("--last", type=click.IntRange(1), default=20, show_default=True)
@click.option("--action", help="Only entries whose action starts with this.")
@_db_url_option
def audit_show(log_path: str | None, last: int, action: str | None,
               db_url: str | None) -> None:
    """The latest entries (with the gateway that wrote each, where one is named)."""
    rows = [e for e in _chain(log_path, db_url).entries()
            if not action or e.action.startswith(action)][-last:]
    for e in rows:
        by = f"{e.actor}@{e.gateway}" if e.gateway else e.actor
        click.echo(f"{e.seq:>6} {e.ts} {by:<12} {e.action:<22} {e.target} "
                   f"{json.dumps(e.details, sort_keys=True)}")


@click.command("audit-archive")
@click.argument("source", type=click.Path())
@click.option("--results", "results_path", type=click.Path(dir_okay=False),
              help="Resumable results table (SQLite; default ./NAME.audit.sqlite). A rerun "
                   "with the same table audits only new or changed files.")
@click.option("--workers", type=click.IntRange(1, 256), default=2, show_default=True,
              help="Dask LocalCluster worker processes (ignored with --scheduler).")
@click.option("--scheduler", help="Address of an existing Dask scheduler, e.g. "
                                  "tcp://10.0.0.5:8786.")
@click.option("--trust", "trust_paths", multiple=True, type=click.Path(),
              help="CA certificates DICOM signatures must chain to.")
@click.option("--watermark-key", type=click.Path(dir_okay=False),
              help="Watermark key, to check embedded watermarks.")
@click.option("--limit", type=click.IntRange(1), help="Audit at most this many new files.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the summary as JSON here.")
@_audit_option
def audit_archive_command(source: str, results_path: str | None, workers: int,
                          scheduler: str | None, trust_paths: tuple[str, ...],
                          watermark_key: str | None, limit: int | None,
                          json_path: str | None, audit_path: str | None) -> None:
    """Verify, watermark-check and scan every image of an archive on Dask: a folder tree or
    a DICOMweb service root (e.g. http://user:pw@orthanc:8042/dicom-web/; a bearer token
    may come from $RADGUARD_DICOMWEB_TOKEN). Exits 1 when any image is not authentic."""
    import os
    import urllib.parse

    from radguard.dicom.web import is_dicomweb_url
    from radguard.governance.archive import audit_archive

    if is_dicomweb_url(source):
        name = (urllib.parse.urlsplit(source).hostname or "dicomweb").replace(".", "-")
    else:
        name = Path(source).resolve().name or "archive"
    results = results_path or f"{name}.audit.sqlite"
    with _progress(2, "auditing archive") as bar:
        task = bar.add_task("archive", total=None)
        summary = audit_archive(source, results, workers=workers, scheduler=scheduler,
                                trust_paths=trust_paths, watermark_key=watermark_key,
                                limit=limit, token=os.environ.get("RADGUARD_DICOMWEB_TOKEN"),
                                progress=lambda done, total: bar.update(
                                    task, completed=done, total=total))
    if json_path:
        summary.write_json(json_path)
    _audit_log(audit_path).append("archive.audit", summary.source, {
        "results": results, "audited": summary.audited, "skipped": summary.skipped,
        "verdicts": summary.verdicts})
    click.echo(f"{summary.files} files: {summary.audited} audited now on {summary.workers} "
               f"Dask workers ({summary.images_per_second:.1f} images/s), {summary.skipped} "
               f"already in {results}")
    for verdict, count in sorted(summary.verdicts.items()):
        click.echo(f"  {verdict}: {count}")
    for item in summary.attention[:20]:
        click.echo(f"  {item['verdict']}: {item['path']}: {'; '.join(item['reasons'][:1])}")
    if len(summary.attention) > 20:
        click.echo(f"  ... {len(summary.attention) - 20} more (see {results})")
    sys.exit(1 if summary.attention else 0)
