"""The command line: ``dgf`` (a click group) and ``dgf_up``, ``dgf_down``, ``dgf_find``.

A thin shell over :class:`dgf.client.Client`.  Every :class:`DgfError` is turned into one line on
stderr and its exit status in exactly one place (:func:`_run`).
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dgf import errors
from dgf.config import ENV_CONFIG

F = TypeVar("F", bound=Callable[..., Any])


#: Path types made once: click's Path looks its name up in the message catalogue (gettext, a
#: search of the locale directories) each time one is made, which cost ~4 ms a command when
#: every command and the --config of each made its own (64 of them).
_PATH = click.Path()
_FILE = click.Path(dir_okay=False)
_DIR = click.Path(file_okay=False)
_EXISTING_FILE = click.Path(exists=True, dir_okay=False)


def _run(fn: F) -> F:
    """Translate dgf errors into a one-line message and the error's exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.DgfError as exc:
            click.echo(f"{click.get_current_context().command_path}: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was published.", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def config_option(fn: F) -> F:
    return click.option("--config", "config", envvar=ENV_CONFIG, metavar="FILE",
                        type=_FILE,
                        help=f"Client config (principal, key, metaserver). Default: ${ENV_CONFIG}.")(fn)


def _client(config: str | None, options: list[str] | None = None, shared: bool = True,
            links_ahead: bool = False) -> Any:
    """The command's client.  ``shared``: the metaserver link goes through a connection master
    (dgf.mux); commands that move objects pass False, since they talk SSH to the sites anyway.
    ``links_ahead``: connect to the sites the last such command used while the metaserver
    connection is made (dgf_up, dgf_down: six round trips less on a long link)."""
    from dgf.client import Client

    requested = None            # none asked: the archive's (a command that uploads nothing never loads them)
    if options:
        from dgf.dicom.profile import Options

        requested = Options.from_names(options)
    client = Client(config, requested, shared=shared, links_ahead=links_ahead)
    try:
        mismatch = client.check_principal()
    except BaseException:
        client.close()
        raise
    if mismatch:
        click.echo(f"warning: {mismatch}", err=True)
    return client


class _Bar:
    """A byte progress bar (tqdm: rate and ETA) on stderr, only when stderr is a terminal (logs
    and pipes get the summary line, not a stray label); updates from any thread."""

    def __init__(self, total: int, label: str, unit: str = "B") -> None:
        self._lock = threading.Lock()
        self._bar = None
        if total > 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                             file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


#: Failures of one kind beyond this many are summarised, not listed one by one.
LISTED_PER_KIND = 3


def _report_failures(failed: list[Any]) -> int:
    """Print failures, grouping repeated kinds into one line with their count; return the exit
    status they call for (the largest among them)."""
    groups: dict[str, list[Any]] = {}
    for f in failed:
        groups.setdefault(f.group or f.reason, []).append(f)
    for kind, members in groups.items():
        listed = members if len(members) <= LISTED_PER_KIND + 1 else members[:LISTED_PER_KIND]
        for f in listed:
            click.echo(f"error: {f.item}: {f.reason}", err=True)
        if len(listed) < len(members):
            first = members[0]
            verb = "refused" if first.code == errors.PermissionDenied.exit_code else "failed"
            details = sorted({f.detail for f in members if f.detail})
            line = f"{len(members)} {verb}: {kind}" + (f" ({', '.join(details)})" if details else "")
            click.echo(line + (f" - {first.hint}" if first.hint else ""), err=True)
    return max((f.code for f in failed), default=0)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------
# dgf_up


@click.command("up", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, type=_PATH)
@click.option("--to", "to", metavar="DIR", help="Archive directory to place the files in "
              "(default: /<pseudo patient>/<study>/<series>/<sop>.dcm).")
@click.option("--site", metavar="SITE", help="I/O site to store on (default: spread by series).")
@click.option("-r", "--recursive", is_flag=True, help="Upload the files under directories.")
@click.option("--option", "-O", "options", multiple=True, metavar="NAME[=BOOL]",
              help="-O allow_burned_in accepts images with burned-in annotation (their pixels must "
                   "be clean); -O allow_truncated keeps files whose pixel data is cut short (marked "
                   "in their XML header). The de-identification options themselves are the archive's: see "
                   "'dgf admin deid show'.")
@click.option("--replace", is_flag=True, help="Replace files that exist with other content.")
@config_option
@_run
def up_cmd(paths: tuple[str, ...], to: str | None, site: str | None, recursive: bool,
           options: tuple[str, ...], replace: bool, config: str | None) -> None:
    """De-identify DICOM files (PS3.15 Annex E) and upload them to the archive.

    The de-identified file goes to an I/O site, its XML header and the encrypted patient identity
    to the metadata server. Files that are not valid DICOM are reported and skipped; the others
    still go in. Re-running an interrupted upload completes it without duplicates.

    \b
    Examples:
      dgf_up scans/ -r
      dgf_up CT1.dcm CT2.dcm --to /projects/lung --site site-a
    """
    client = _client(config, list(options), shared=False, links_ahead=True)
    with client:
        bars: list[_Bar] = []
        t0 = time.perf_counter()
        try:
            report = client.upload(paths, to=to, site=site, recursive=recursive, replace=replace,
                                   progress=lambda n: bars[0].update(n) if bars else None,
                                   on_total=lambda total: bars.append(_Bar(total, "de-identifying and uploading")))
        finally:
            for bar in bars:
                bar.close()
        dt = time.perf_counter() - t0
    for w in report.warnings:
        click.echo(f"warning: {w.item}: {w.reason}", err=True)
    status = _report_failures(report.failed)
    rate = report.uploaded / dt if dt > 0 else 0.0
    click.echo(f"uploaded {report.uploaded} file(s), {_mb(report.bytes)} in {dt:.1f} s "
               f"({rate:.0f} files/s, {report.bytes / 1e6 / dt if dt > 0 else 0.0:.0f} MB/s)"
               + (f"; {report.already} already stored" if report.already else "")
               + (f"; {len(report.failed)} failed" if report.failed else ""))
    if status:
        sys.exit(status)


# --------------------------------------------------------------------------------------------
# dgf_down


@click.command("down", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, type=str)
@click.option("-o", "--output", "out", default=".", show_default=True, type=_DIR,
              help="Local directory to write into.")
@click.option("--identified", is_flag=True,
              help="Restore the exact original files (clinicians only; every release is audited).")
@click.option("--find", "xpath", metavar="XPATH", help="Download the files under PATHS (default /) "
              "whose header matches XPATH.")
@config_option
@_run
def down_cmd(paths: tuple[str, ...], out: str, identified: bool, xpath: str | None, config: str | None) -> None:
    """Download files or directories from the archive, de-identified by default.

    \b
    Examples:
      dgf_down /P6BVX... -o ./cohort
      dgf_down --find "/DicomHeader[Modality='CT']" -o ./ct
      dgf_down /P6BVX.../1.2.3/4.5.6/7.8.9.dcm --identified -o ./clinic
    """
    if not paths and xpath is None:
        raise errors.UsageError("name at least one archive path, or use --find XPATH.")
    with _client(config, shared=False, links_ahead=True) as client:
        t0 = time.perf_counter()
        bars: list[_Bar] = []
        try:
            report = client.download(list(paths), out, identified=identified, xpath=xpath,
                                     progress=lambda n: bars[0].update(n) if bars else None,
                                     on_total=lambda total: bars.append(_Bar(total, "downloading")))
        finally:
            for bar in bars:
                bar.close()
        dt = time.perf_counter() - t0
    status = _report_failures(report.failed)
    what = "re-identified" if identified else "de-identified"
    click.echo(f"downloaded {report.downloaded} {what} file(s), {_mb(report.bytes)} to {out} in {dt:.1f} s"
               + (f"; {len(report.failed)} failed" if report.failed else ""))
    if status:
        sys.exit(status)


# --------------------------------------------------------------------------------------------
# dgf_find


@click.command("find", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("xpath")
@click.argument("path", default="/")
@click.option("--level", type=click.Choice(["instance", "series", "study", "patient"]), default="instance",
              show_default=True, help="One row per matching file, or per distinct series/study/patient "
              "(with the number of matching files and its directory).")
@click.option("--show", metavar="KEYWORD,...", default="", help="Header values to print, by DICOM keyword; "
              "per study also ModalitiesInStudy, NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances; "
              "per series NumberOfSeriesRelatedInstances; per patient NumberOfPatientRelatedStudies, "
              "-Series, -Instances (counts of matching files).")
@click.option("--format", "fmt", type=click.Choice(["paths", "csv", "json", "jsonl", "dicom-json"]),
              default="paths", show_default=True,
              help="Output format; every format streams as results arrive. json/jsonl are typed "
              "(numbers as numbers, multiple values as lists, absent as null); dicom-json is the DICOM "
              "JSON model of PS3.18 F.2, as DICOMweb clients read it.")
@click.option("--count", is_flag=True, help="Print only the number of matching files (or, with --level, "
              "of matching series, studies or patients).")
@click.option("--limit", type=int, default=0, help="Stop after this many rows (0: all).")
@click.option("--explain", is_flag=True, help="Show which predicates use the index, and run nothing.")
@click.option("--timeout", type=float, default=0.0, help="Give up after this many seconds "
              "(the server also has its own limit).")
@config_option
@_run
def find_cmd(xpath: str, path: str, level: str, show: str, fmt: str, count: bool, limit: int,
             explain: bool, timeout: float, config: str | None) -> None:
    """Find files under PATH whose de-identified XML header matches XPATH (XPath 1.0).

    Elements are named by DICOM keyword; multi-valued attributes match per value; sequences
    nest <Item> elements. No bulk data is read. XPATH may be @NAME, a query saved with
    'dgf query save'. Equality, numeric and date ranges, contains/starts-with, existence,
    and/or/not and sequence-item tests are answered from an index; other parts are checked on
    the candidates (see --explain).

    Dates are numbers in DICOM form (StudyDate >= 20100101); an ISO date ('2010-01-01') is read
    as that DICOM date, with a note. Ages are text (030Y): compare them as text or through
    number(substring(PatientAge, 1, 3)). A name that is no DICOM keyword and no stored element
    (a typo: Modalty) is warned about on stderr, with the nearest keyword.

    \b
    Examples:
      dgf_find "/DicomHeader[Modality='CT' and PatientSex='F']"
      dgf_find "/DicomHeader[SliceThickness <= 1.0 and StudyDate >= 20190101]" --level study
      dgf_find "/DicomHeader" --level study --show ModalitiesInStudy,NumberOfStudyRelatedSeries
      dgf_find "//ProcedureCodeSequence/Item[CodeValue='ZZ']" --count
      dgf_find @ct-thin /projects --show PatientID,SeriesDescription --format csv
    """
    keywords = [k.strip() for k in show.split(",") if k.strip()]

    def warn(text: str) -> None:
        click.echo(f"dgf_find: warning: {text}", err=True)

    with _client(config) as client:
        if explain:
            plan = client.explain(xpath, path)
            for w in plan.get("warnings", []):
                warn(w)
            click.echo(f"strategy: {plan['strategy']}")
            for p in plan["predicates"]:
                click.echo(f"  {p['how']}: {p['expression']}")
            return
        if count:
            click.echo(client.find_count(xpath, path, timeout, level, on_warning=warn))
            return
        rows = client.find_iter(xpath, path, keywords, limit, timeout, level, on_warning=warn)
        _print_rows(rows, fmt, level, keywords)


def _json_row(r: dict[str, Any], keywords: list[str]) -> dict[str, Any]:
    """--format json: values typed, one value as itself, several as a list, absent as null."""
    from dgf import dicomjson

    vrs = r.get("vr", {})
    values = {}
    for k in keywords:
        typed = dicomjson.typed(r["values"].get(k, ""), vrs.get(k, ""))
        values[k] = None if not typed else typed[0] if len(typed) == 1 else typed
    return {**{k: v for k, v in r.items() if k not in ("values", "vr")}, "values": values}


def _dicom_json(r: dict[str, Any], keywords: list[str], group_key: str | None) -> dict[str, Any]:
    """One result as a DICOM JSON dataset (PS3.18 F.2): attributes by tag, with vr and Value;
    the archive path as RetrieveURL (0008,1190)."""
    from dgf import dicomjson

    vrs = dict(r.get("vr", {}))
    values = dict(r["values"])
    if group_key:
        values[group_key], vrs[group_key] = r[group_key], "UI" if group_key != "PatientID" else "LO"
    out = dicomjson.dataset(values, ([group_key] if group_key else []) + keywords, vrs)
    out["00081190"] = {"vr": "UR", "Value": ["dgf:" + r["path"]]}
    return dict(sorted(out.items()))


def _print_rows(rows: Any, fmt: str, level: str, keywords: list[str]) -> None:
    """Print rows as they arrive, in the chosen format."""
    group_key = {"patient": "PatientID", "study": "StudyInstanceUID", "series": "SeriesInstanceUID"}.get(level)
    head = [group_key, "files", "path"] if group_key else ["path"]

    def cells(r: dict[str, Any]) -> list[str]:
        return [str(r[h]) for h in head] + [r["values"].get(k, "") for k in keywords]

    writer = csv.writer(sys.stdout) if fmt == "csv" else None
    if writer is not None:
        writer.writerow([*head, *keywords])
    array = fmt in ("json", "dicom-json")
    if array:
        sys.stdout.write("[")
    for i, r in enumerate(rows):
        if fmt == "json":
            sys.stdout.write(("," if i else "") + "\n " + json.dumps(_json_row(r, keywords)))
        elif fmt == "dicom-json":
            sys.stdout.write(("," if i else "") + "\n " + json.dumps(_dicom_json(r, keywords, group_key)))
        elif fmt == "jsonl":
            sys.stdout.write(json.dumps(_json_row(r, keywords)) + "\n")
        elif writer is not None:
            writer.writerow(cells(r))
        else:
            sys.stdout.write("\t".join(cells(r)) + "\n")
    if array:
        sys.stdout.write("\n]\n")
    sys.stdout.flush()


@click.group("query", context_settings={"help_option_names": ["-h", "--help"]})
def query_group() -> None:
    """Saved queries: name an XPath once, use it as dgf_find @NAME (and under the mount's .queries/)."""


@query_group.command("save")
@click.argument("name")
@click.argument("xpath")
@config_option
@_run
def query_save(name: str, xpath: str, config: str | None) -> None:
    """Save XPATH as your query NAME (replacing your older NAME); the expression is checked
    first.  Queries belong to who saved them: yours is YOU/NAME, which everyone may use and only
    you (or an admin) may change; an admin's bare NAME is shared.  @NAME finds your own NAME,
    else the shared one; @OWNER/NAME names anyone's.  Audited.

    \b
    Example:
      dgf query save ct-thin "/DicomHeader[Modality='CT' and SliceThickness <= 1]"
      dgf_find @ct-thin --level series
      dgf_find @alice/ct-thin
    """
    with _client(config) as client:
        click.echo(f"saved as {client.save_query(name, xpath)}")


@query_group.command("list")
@config_option
@_run
def query_list(config: str | None) -> None:
    """List saved queries: NAME<TAB>XPATH."""
    with _client(config) as client:
        for name, xpath in client.saved_queries().items():
            click.echo(f"{name}\t{xpath}")


@query_group.command("rm")
@click.argument("name")
@config_option
@_run
def query_rm(name: str, config: str | None) -> None:
    """Remove your saved query NAME (an admin: any saved query).  Audited."""
    with _client(config) as client:
        click.echo(f"removed {client.remove_query(name)}")


# --------------------------------------------------------------------------------------------
# dgf (the group)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dgf")
def main() -> None:
    """dgf: a federated PACS file-system layer.

    DICOM files are de-identified on upload and kept on site I/O servers; one metadata server
    holds the namespace, the XML headers and the encrypted patient identity. Start a local
    federation with 'dgf local up DIR', then use DIR/clinician.conf (or set DGF_CONFIG).
    """


main.add_command(up_cmd)
main.add_command(down_cmd)
main.add_command(find_cmd)
main.add_command(query_group)


@main.command("mount")
@click.argument("mountpoint", type=_DIR)
@click.option("--identified", is_flag=True, help="Files read as the exact originals, with patient identity "
              "(clinicians only; every open is an audited release).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (Ctrl-C unmounts).")
@click.option("-o", "mount_options", metavar="ro", default="", help="Mount options; 'ro' mounts read-only.")
@config_option
@_run
def mount_cmd(mountpoint: str, identified: bool, foreground: bool, mount_options: str, config: str | None) -> None:
    """Show the archive as a directory at MOUNTPOINT (FUSE).

    Files read as de-identified DICOM; 'getfattr -n user.dgf.dicom FILE' prints the XML header.
    Copying a DICOM file in uploads it (de-identified) at that path. MOUNTPOINT/.find/<XPath>/
    lists matches as symlinks (XPath percent-encoded, or a predicate like Modality='CT');
    MOUNTPOINT/.queries/NAME/ lists a saved query's matches. Changes made elsewhere show up
    within 10 seconds.

    \b
    Examples:
      dgf mount ~/pacs && ls -l ~/pacs
      getfattr -n user.dgf.dicom ~/pacs/P123/study/series/1.dcm
      ls ~/pacs/.find/"Modality='CT' and SliceThickness <= 1"
      dgf umount ~/pacs
    """
    from dgf import fuse

    opts = {o.strip() for o in mount_options.split(",") if o.strip()}
    unknown = opts - {"ro", "rw"}
    if unknown:
        raise errors.UsageError(f"unknown mount option {sorted(unknown)[0]!r}; dgf mount knows 'ro'.")
    fuse.mount(mountpoint, config, identified, foreground, "ro" in opts)


@main.command("umount")
@click.argument("mountpoint", type=_DIR)
@click.option("--lazy", is_flag=True, help="Detach now even if files are open; finish when they close.")
@_run
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount a dgf mount."""
    from dgf import fuse

    fuse.umount(mountpoint, lazy)


def _print_stats(stats: Any, long: bool) -> None:
    for st in stats:
        name = st.path.rsplit("/", 1)[-1] or "/"
        if long:
            kind = "d" if st.is_dir else "-"
            mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.mtime))
            click.echo(f"{kind}{_mode(st.mode)} {st.nlink:>3} {st.size:>12} {mtime} {name}{'/' if st.is_dir else ''}")
        else:
            click.echo(name + ("/" if st.is_dir else ""))


def _mode(mode: int) -> str:
    bits = "rwxrwxrwx"
    return "".join(b if mode & (1 << (8 - i)) else "-" for i, b in enumerate(bits))


@main.command("ls")
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, links, size, time.")
@config_option
@_run
def ls_cmd(path: str, long: bool, config: str | None) -> None:
    """List a directory of the archive."""
    with _client(config) as client:
        st = client.stat(path)
        _print_stats(client.ls(path) if st.is_dir else [st], long)


@main.command("fsck")
@click.argument("path", default="/")
@click.option("--repair", is_flag=True, help="Copy under-replicated objects site to site, forget copies "
              "that are gone, remove extra copies and orphans older than --grace.")
@click.option("--adopt", is_flag=True, help="After restoring the metadata from a backup: take orphans "
              "older than --grace back into the archive (under /lost+found) instead of removing them.")
@click.option("--grace", type=float, default=1.0, show_default=True, metavar="HOURS",
              help="Leave orphans younger than this (an upload may be about to commit them).")
@config_option
@_run
def fsck_cmd(path: str, repair: bool, adopt: bool, grace: float, config: str | None) -> None:
    """Check that every file under PATH has its object, intact, in as many copies as its
    directory keeps (admin).

    Each site re-hashes its own copies (the bytes stay there); a whole-archive check (PATH /)
    also finds orphans, objects a site stores that no file records there. With --repair, copies
    are made site to site from a sound one, the records of missing or corrupt copies are dropped,
    copies beyond the directory's count and old orphans removed; every step is audited. Exit 0 when the archive is whole, 6 when
    something is missing, corrupt, under-replicated or a site did not answer.

    \b
    Examples:
      dgf fsck                      # the whole archive, report only
      dgf fsck /projects --repair   # mend what is under /projects
      dgf fsck --adopt --repair     # after a restore: files written since the backup come back
    """
    from dgf.fsck import fsck

    if adopt and path.rstrip("/"):
        raise errors.UsageError("--adopt looks for orphans, which only a whole-archive check (PATH /) finds.")
    with _client(config, shared=False) as client:
        report = fsck(client, path, repair, grace * 3600.0, progress=lambda line: click.echo(line, err=True),
                      adopt=adopt)
    _print_fsck(report)
    if not report.whole:
        sys.exit(errors.IntegrityError.exit_code)


def _print_fsck(r: Any) -> None:
    def listed(what: str, items: list[Any], show: Callable[[Any], str]) -> None:
        if items:
            click.echo(f"{len(items)} {what}:")
            for item in items[:LISTED_PER_KIND]:
                click.echo(f"  {show(item)}")
            if len(items) > LISTED_PER_KIND:
                click.echo(f"  ... and {len(items) - LISTED_PER_KIND} more")

    for site, why in sorted(r.unreachable.items()):
        click.echo(f"site {site} did not answer: {why}")
    listed("lost (no intact copy anywhere)", r.lost, str)
    listed("missing copies", r.missing, lambda m: f"{m[0]} at site {m[1]}")
    listed("corrupt copies (quarantined)", r.corrupt, lambda m: f"{m[0]} at site {m[1]}")
    listed("under-replicated", r.under, lambda u: f"{u[0]}: {u[1]} of {u[2]} copies")
    listed("over-replicated" if r.repair else "over-replicated (--repair removes the extra copies)", r.over,
           lambda u: f"{u[0]}: {u[1]} copies, {u[2]} kept")
    listed("orphans", r.orphans, lambda o: f"site {o[0]}: {o[1][:16]}... ({o[2]} bytes, {o[3] / 3600:.1f} h old)")
    if r.repair:
        listed("copies made site to site", r.copied, lambda c: f"{c[0]} -> site {c[1]}")
        listed("records of gone copies dropped", r.dropped, lambda d: f"{d[0]} at site {d[1]}")
        listed("extra copies removed", r.trimmed, lambda t: f"{t[0]} at site {t[1]}")
        listed("orphans removed", r.removed, lambda o: f"site {o[0]}: {o[1][:16]}...")
    listed("orphans adopted as files", r.adopted, lambda a: f"{a[0]} (site {a[1]})")
    listed("orphans adopted as copies of known objects", r.readopted, lambda a: f"site {a[0]}: {a[1][:16]}...")
    listed("copies stored again while fsck ran (left for the next fsck)", r.kept, str)
    listed("repairs that failed", r.failures, str)
    rate = f", {r.bytes_copied / max(r.seconds, 1e-9) / 1e6:.0f} MB/s copied" if r.bytes_copied else ""
    state = "whole" if r.whole else "NOT whole"
    click.echo(f"{r.objects} objects, {r.copies_checked} copies checked in {r.seconds:.1f} s{rate}: {state}")


@main.command("grants")
@config_option
@_run
def grants_cmd(config: str | None) -> None:
    """Show whether the archive runs grant-only, and your cohort grants (ID, query, last day)."""
    with _client(config) as client:
        reply = client.meta.call("grants.mine")[0]
    click.echo(f"access: {reply['mode']}")
    for g in reply["grants"]:
        click.echo(_grant_line(g))


def _grant_line(g: dict[str, Any], *extra: str) -> str:
    """ID, [extra columns,] @QUERY, last day (UTC), and 'expired' once it has ended."""
    last = time.strftime("%Y-%m-%d", time.gmtime(g["until"] - 1))
    state = "" if g["until"] > time.time() else "\texpired"
    return "\t".join([str(g["id"]), *extra[:1], f"@{g['query']}", last, *extra[1:]]) + state


@main.command("stat")
@click.argument("path")
@config_option
@_run
def stat_cmd(path: str, config: str | None) -> None:
    """Show the attributes of a file or directory, with its replicas: a file with fewer healthy
    copies than its directory keeps is marked under_replicated (asynchronous replication still
    copying, or a copy lost: 'dgf fsck --repair')."""
    with _client(config) as client:
        st = client.stat(path)
        info = st.to_wire()
        if not st.is_dir:
            # Readers are sent only to healthy replicas; a quarantined one shows with its state.
            info["sites"] = [site for site, state in st.replicas if state == "ok"]
            info["replicas"] = [{"site": site, "state": state} for site, state in st.replicas]
            if len(info["sites"]) < st.copies_wanted:
                info["under_replicated"] = True     # copies are being made (or 'dgf fsck --repair')
        click.echo(json.dumps(info, indent=1))


@main.command("rm")
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Remove directories and their contents.")
@config_option
@_run
def rm_cmd(paths: tuple[str, ...], recursive: bool, config: str | None) -> None:
    """Remove files (and with -r, directories) from the archive. Deletions are audited."""
    with _client(config) as client:
        n = sum(client.rm(p, recursive) for p in paths)
    click.echo(f"removed {n} file(s)")


@main.command("mv")
@click.argument("src")
@click.argument("dst")
@config_option
@_run
def mv_cmd(src: str, dst: str, config: str | None) -> None:
    """Rename or move a file or directory (atomic, also across directories)."""
    with _client(config) as client:
        try:
            if client.stat(dst).is_dir:
                dst = dst.rstrip("/") + "/" + src.rstrip("/").rsplit("/", 1)[-1]
        except errors.NotFound:
            pass
        client.mv(src, dst)


@main.command("mkdir")
@click.argument("paths", nargs=-1, required=True)
@click.option("-p", "--parents", is_flag=True, help="Make parent directories as needed; no error if existing.")
@config_option
@_run
def mkdir_cmd(paths: tuple[str, ...], parents: bool, config: str | None) -> None:
    """Create directories in the archive."""
    with _client(config) as client:
        for p in paths:
            client.mkdir(p, parents=parents)


@main.group("xattr")
def xattr_group() -> None:
    """Read and write extended attributes (user.dgf.dicom is the XML header)."""


@xattr_group.command("get")
@click.argument("path")
@click.argument("name", default="user.dgf.dicom")
@click.option("--pretty", is_flag=True, help="Indent an XML value for reading.")
@click.option("--as", "model", type=click.Choice(["native", "dcmtk"]),
              help="Export the XML header: 'native' = DICOM PS3.19 Native DICOM Model, "
                   "'dcmtk' = dcmtk's format (xml2dcm turns it into a DICOM file).")
@config_option
@_run
def xattr_get(path: str, name: str, pretty: bool, model: str | None, config: str | None) -> None:
    """Print one extended attribute (default: the XML header).

    \b
    dgf xattr get /study/1.dcm --pretty
    dgf xattr get /study/1.dcm --as native > 1.xml
    dgf xattr get /study/1.dcm --as dcmtk > h.xml && xml2dcm h.xml header.dcm
    """
    with _client(config) as client:
        value = client.getxattr(path, name)
    if model == "native":
        from dgf.dicom.native import write_native  # without pydicom: no dictionary is needed

        write_native(value, sys.stdout.buffer.write)
        sys.stdout.buffer.flush()
        return
    if model:
        from dgf.dicom.xmlheader import export

        value = export(value, model)
    if pretty and value.startswith(b"<"):
        from lxml import etree

        value = etree.tostring(etree.fromstring(value), pretty_print=True).rstrip()
    sys.stdout.buffer.write(value + b"\n")


@xattr_group.command("set")
@click.argument("path")
@click.argument("name")
@click.argument("value")
@config_option
@_run
def xattr_set(path: str, name: str, value: str, config: str | None) -> None:
    """Set a user.* extended attribute (user.dgf.* is maintained by dgf)."""
    with _client(config) as client:
        client.setxattr(path, name, value.encode())


@xattr_group.command("list")
@click.argument("path")
@config_option
@_run
def xattr_list(path: str, config: str | None) -> None:
    """List the extended attributes of a file."""
    with _client(config) as client:
        for name in client.listxattr(path):
            click.echo(name)


@xattr_group.command("rm")
@click.argument("path")
@click.argument("name")
@config_option
@_run
def xattr_rm(path: str, name: str, config: str | None) -> None:
    """Remove a user.* extended attribute."""
    with _client(config) as client:
        client.removexattr(path, name)


@main.command("whoami")
@config_option
@_run
def whoami_cmd(config: str | None) -> None:
    """Show the principal and role this config authenticates as."""
    with _client(config) as client:
        me = client.whoami()
    click.echo(f"{me['name']} ({me['role']})")


@main.command("identity")
@click.argument("path")
@config_option
@_run
def identity_cmd(path: str, config: str | None) -> None:
    """Show what de-identification removed from a file (clinicians only; audited)."""
    with _client(config) as client:
        click.echo(json.dumps(client.identity_summary(path), indent=1))


@main.group("admin")
def admin_group() -> None:
    """Administration: principals, sites, audit log (admin role)."""


@admin_group.group("principal")
def principal_group() -> None:
    """Enroll, list and remove principals (users and sites)."""


@principal_group.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "clinician", "researcher", "site"]))
@click.option("--public-key", "pubkey", required=True, type=_EXISTING_FILE,
              help="File with the principal's ssh-ed25519 public key.")
@config_option
@_run
def principal_add(name: str, role: str, pubkey: str, config: str | None) -> None:
    """Enroll a principal with a role and an SSH public key (audited)."""
    with _client(config) as client:
        p = client.principal_add(name, role, Path(pubkey).read_text().strip())
    click.echo(f"enrolled {p['name']} ({p['role']}) {p['fingerprint']}")


@principal_group.command("list")
@config_option
@_run
def principal_list(config: str | None) -> None:
    """List enrolled principals."""
    with _client(config) as client:
        for p in client.principals():
            click.echo(f"{p['name']}\t{p['role']}\t{p['fingerprint']}")


@principal_group.command("remove")
@click.argument("name")
@config_option
@_run
def principal_remove(name: str, config: str | None) -> None:
    """Remove a principal; its key is refused from then on (audited)."""
    with _client(config) as client:
        client.principal_remove(name)


@admin_group.group("site")
def site_group() -> None:
    """I/O sites."""


@site_group.command("list")
@config_option
@_run
def site_list(config: str | None) -> None:
    """List registered I/O sites and their addresses (and which are draining)."""
    with _client(config) as client:
        reply = client.meta.call("site.list")[0]
    for s in reply["sites"]:
        click.echo(f"{s['name']}\t{s['host']}:{s['port']}\tzone {s.get('zone') or '-'}"
                   + ("\tuntrusted" if s.get("untrusted") else "")
                   + ("\tdraining" if s["name"] in reply.get("draining", []) else ""))


@site_group.command("add")
@click.argument("name")
@click.argument("address", metavar="HOST:PORT")
@click.option("--key", "key_file", type=_EXISTING_FILE,
              help="The site's public key (the key.pub 'dgf-ioserver init' wrote); enrols the site.")
@click.option("--zone", default="", help="Failure domain (building, rack, region): copies go to distinct zones.")
@click.option("--host-key", "expected", metavar="SHA256:...",
              help="The host key fingerprint you expect (from 'dgf-ioserver init'); pinned without asking.")
@click.option("--yes", is_flag=True, help="Pin the host key the site presents without asking.")
@click.option("--untrusted", is_flag=True,
              help="The site (a cloud bucket, a partner) is given sealed objects only; see 'dgf admin site trust'.")
@config_option
@_run
def site_add(name: str, address: str, key_file: str | None, zone: str, expected: str | None, yes: bool,
             untrusted: bool, config: str | None) -> None:
    """Add I/O site NAME at HOST:PORT (admin).  The site is contacted first and its SSH host key
    shown; once you confirm it (or it matches --host-key) the key is pinned: every client
    refuses a site that presents another, and the site may not change it on registering.
    The site may already run ('dgf-ioserver serve' waits until it is added).  Audited.

    \b
    Example (on the site host: dgf-ioserver init --config /etc/dgf/site-east.conf):
      dgf admin site add site-east 10.0.1.5:7102 --key site-east.pub --zone east
    """
    from dgf import config as dgf_config
    from dgf import crypto
    from dgf.ssh import probe_host_key

    host, port = dgf_config.parse_address(address, "HOST:PORT")
    public_key = Path(key_file).read_text().strip() if key_file else ""
    with _client(config) as client:
        host_key = probe_host_key(host, port)
        fingerprint = crypto.fingerprint(host_key)
        click.echo(f"site {name} at {host}:{port} presents host key {fingerprint}", err=True)
        if expected is not None:
            if expected.strip() != fingerprint:
                raise errors.AuthenticationFailed(f"{host}:{port} presents host key {fingerprint}, not the "
                                                  f"{expected.strip()} you expected; nothing was pinned.")
        elif not yes and not click.confirm("Pin this host key for the site?", err=True):
            raise errors.UsageError("the host key was not confirmed; nothing was pinned.")
        client.meta.call("admin.site.add", site=name, host=host, port=port, host_key=host_key,
                         zone=zone, **({"public_key": public_key} if public_key else {}))
        if untrusted:
            client.meta.call("admin.site.trust", site=name, untrusted=True)
    click.echo(f"site {name} added at {host}:{port}, host key {fingerprint} pinned"
               + (", untrusted (sealed objects only)" if untrusted else ""))


@site_group.command("trust")
@click.argument("name")
@click.option("--untrusted/--trusted", default=True, show_default=True,
              help="Untrusted: the site holds only sealed objects and never sees a key.")
@config_option
@_run
def site_trust(name: str, untrusted: bool, config: str | None) -> None:
    """Say whether site NAME may see de-identified bytes (admin).  An untrusted site (a cloud
    bucket, a partner hospital) is given only objects sealed by the uploading client with
    AES-256-GCM under a key per study; the metaserver releases those keys to readers beside
    their capabilities, and erasing a patient destroys them.  A site that already holds
    unsealed objects must be drained first.  Audited.

    \b
    Example:
      dgf admin site trust cloud-eu --untrusted
    """
    with _client(config) as client:
        client.meta.call("admin.site.trust", site=name, untrusted=untrusted)
    click.echo(f"site {name} is {'untrusted: it is given sealed objects only' if untrusted else 'trusted'}")


@site_group.command("drain")
@click.argument("name")
@click.option("--cancel", is_flag=True, help="Let the site take new copies again.")
@config_option
@_run
def site_drain(name: str, cancel: bool, config: str | None) -> None:
    """Move every object off site NAME while reads go on (admin): no new copies go there, each
    object it holds is copied to another site (site to site) before its copy there is removed.
    Objects no other site can take stay and are named; run it again once there is room.
    Then 'dgf admin site remove NAME'.  Audited."""
    with _client(config) as client:
        if cancel:
            client.meta.call("admin.site.drain", site=name, on=False)
            click.echo(f"site {name} takes new copies again")
            return
        from dgf.fsck import drain

        report = drain(client, name, progress=lambda line: click.echo(line, err=True))
    for line in report.stuck[:LISTED_PER_KIND]:
        click.echo(f"stays: {line}", err=True)
    click.echo(f"site {name}: {len(report.moved)} object(s) moved ({report.bytes_moved / 1e6:.1f} MB), "
               f"{len(report.released)} unsound cop(ies) released, {len(report.stuck)} stay, "
               f"in {report.seconds:.1f} s")
    if report.stuck:
        sys.exit(errors.ServerError.exit_code)


@site_group.command("remove")
@click.argument("name")
@config_option
@_run
def site_remove(name: str, config: str | None) -> None:
    """Forget site NAME and its key (admin).  Refused while it holds the only sound copy of any
    object: drain it first.  Copies it held are forgotten ('dgf fsck --repair' makes them
    again elsewhere).  Audited."""
    with _client(config) as client:
        n = client.meta.call("admin.site.remove", site=name)[0]["forgotten"]
    click.echo(f"site {name} removed; {n} record(s) of copies there forgotten")


@admin_group.group("replicas")
def replicas_group() -> None:
    """How many copies of each file the archive keeps (per directory, inherited)."""


def _show_replicas(info: dict[str, Any]) -> None:
    where = f"set at {info['set_at']}" if info["set_at"] else f"the default for {info['sites']} site(s)"
    click.echo(f"{info['path']}: {info['copies']} cop{'y' if info['copies'] == 1 else 'ies'} ({where})")


@replicas_group.command("get")
@click.argument("path", default="/")
@config_option
@_run
def replicas_get(path: str, config: str | None) -> None:
    """Show how many copies files under PATH get, and where that is set."""
    with _client(config) as client:
        _show_replicas(client.meta.call("replicas.get", path=path)[0])


@replicas_group.command("set")
@click.argument("path")
@click.argument("copies", type=int)
@config_option
@_run
def replicas_set(path: str, copies: int, config: str | None) -> None:
    """Keep COPIES copies (on distinct sites) of every file uploaded under directory PATH from
    now on; 0 inherits from the parent again.  The default is 2 once there are two sites.
    Uploads publish a file only when all its copies are durable (see 'dgf admin replicas mode').
    Audited.

    \b
    Example: dgf admin replicas set /projects/trial 3
    """
    with _client(config) as client:
        _show_replicas(client.meta.call("admin.replicas.set", path=path, copies=copies)[0])


def _show_or_set(config: str | None, verb: str, label: str, mode: str | None) -> None:
    """An archive-wide mode: set it when given, then print what the metaserver says it is."""
    with _client(config) as client:
        got = client.meta.call(verb, **({"mode": mode} if mode else {}))[0]["mode"]
    click.echo(f"{label}: {got}")


@replicas_group.command("mode")
@click.argument("mode", required=False, type=click.Choice(["sync", "async"]))
@config_option
@_run
def replicas_mode(mode: str | None, config: str | None) -> None:
    """Show or set how uploads are replicated (admin; audited).

    \b
    sync   (the default) a file is published only once every copy its directory keeps is
           durable: when an upload succeeds, losing any one site loses nothing.  This is what
           a modality that deletes its images after a successful store needs.
    async  a file is published once one copy is durable; 'dgf stat' shows it
           under_replicated until the sites have copied it (site to site, in the background,
           within seconds).  Uploads cost one copy and go on while a site is down; a site lost
           in that window loses the files it alone held.
    """
    _show_or_set(config, "admin.replicas.mode", "replication", mode)


@admin_group.group("deid")
def deid_group() -> None:
    """The archive's de-identification options (PS3.15 Annex E options), which every upload uses."""


@deid_group.command("show")
@config_option
@_run
def deid_show(config: str | None) -> None:
    """Show the options uploads to this archive use."""
    from dgf.dicom.profile import OPTIONS

    with _client(config) as client:
        names = client.meta.call("deid.options")[0]["options"]
    for name, (_, code, meaning) in OPTIONS.items():
        click.echo(f"{'on ' if name in names else 'off'}  {name:<32} {code} {meaning}")


@deid_group.command("set")
@click.argument("names", nargs=-1)
@config_option
@_run
def deid_set(names: tuple[str, ...], config: str | None) -> None:
    """Set the archive's options to exactly NAMES (none: the Basic Profile alone); audited.

    \b
    Example: dgf admin deid set retain_patient_characteristics retain_long_modified_dates
    """
    with _client(config) as client:
        now = client.meta.call("admin.deid.set", options=list(names))[0]["options"]
    click.echo("uploads now use: Basic Profile" + "".join(f" + {n}" for n in now))


@admin_group.command("backup")
@click.argument("file", type=_FILE)
@config_option
@_run
def backup_cmd(file: str, config: str | None) -> None:
    """Write a consistent copy of the metadata database to FILE while the archive keeps serving
    (admin; SQLite's online backup; for PostgreSQL use pg_dump).  Patient identities in it stay
    encrypted under the vault key, which is not in the copy: keep the vault key file safe
    apart.  Restore: stop the metaserver, put FILE in place of its database, start it, then run
    'dgf fsck' (files uploaded after the backup show as orphans on the sites).  Audited."""
    import os

    target = Path(file)
    if target.exists():
        raise errors.AlreadyExists(f"{file} exists; name a new file.")
    partial = target.with_name(target.name + ".partial")
    with _client(config) as client:
        try:
            result = client.meta.call_to_file("admin.backup", partial, wait_s=3600.0)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    click.echo(f"backed up the metadata ({result.get('size', target.stat().st_size) / 1e6:.1f} MB) to {file}")


@admin_group.command("access")
@click.argument("mode", required=False, type=click.Choice(["open", "grants"]))
@config_option
@_run
def access_cmd(mode: str | None, config: str | None) -> None:
    """Show or set who sees what (admin; audited).

    \b
    open    (the default) every researcher sees the whole de-identified archive.
    grants  a researcher sees, finds, downloads and mounts only the files of its unexpired
            cohort grants ('dgf admin grant add'); everything else does not exist for it.
            Clinicians and admins are not restricted.
    """
    _show_or_set(config, "admin.access", "access", mode)


@admin_group.group("grant")
def grant_group() -> None:
    """Cohort grants: a researcher's access to the files a saved query matches, until a date."""


@grant_group.command("add")
@click.argument("principal")
@click.argument("saved", metavar="@QUERY")
@click.option("--until", required=True, metavar="YYYY-MM-DD", help="The last day of the grant (UTC).")
@config_option
@_run
def grant_add(principal: str, saved: str, until: str, config: str | None) -> None:
    """Grant researcher PRINCIPAL the files saved query @QUERY matches, until the end of the
    day --until (admin; audited).  The query's XPath is copied into the grant, so a later edit
    of the query does not widen it.  Takes effect when the archive runs 'dgf admin access grants'.

    \b
    Example:
      dgf query save lung-ct "/DicomHeader[Modality='CT' and BodyPartExamined='CHEST']"
      dgf admin grant add alice @lung-ct --until 2027-06-30
    """
    import calendar

    try:
        day = time.strptime(until, "%Y-%m-%d")
    except ValueError as exc:
        raise errors.UsageError(f"--until is a date, YYYY-MM-DD, not {until!r}.") from exc
    end = calendar.timegm(day) + 86400.0
    with _client(config) as client:
        gid = client.meta.call("admin.grant.add", principal=principal, saved=saved, until=end)[0]["id"]
    click.echo(f"grant {gid}: {principal} sees {saved} until {until} (end of day, UTC)")


@grant_group.command("list")
@click.argument("principal", required=False)
@config_option
@_run
def grant_list(principal: str | None, config: str | None) -> None:
    """List grants: ID, principal, query, last day, XPath."""
    with _client(config) as client:
        rows = client.meta.call("admin.grant.list", **({"principal": principal} if principal else {}))[0]["grants"]
    for g in rows:
        click.echo(_grant_line(g, g["principal"], g["xpath"]))


@grant_group.command("remove")
@click.argument("gid", metavar="ID", type=int)
@config_option
@_run
def grant_remove(gid: int, config: str | None) -> None:
    """Revoke grant ID (admin; audited); it stops within seconds."""
    with _client(config) as client:
        client.meta.call("admin.grant.remove", id=gid)
    click.echo(f"grant {gid} revoked")


@admin_group.group("vault")
def vault_group() -> None:
    """The identity vault's key."""


@vault_group.command("rotate")
@config_option
@_run
def vault_rotate(config: str | None) -> None:
    """Replace the key that wraps every patient's data key (admin; audited).  The new key is
    written beside the old, every data key re-wrapped in one transaction, then the new key takes
    the old one's place (sealed with the same passphrase, if the old one was).  Pseudonyms do
    not change.  Other metaserver processes over the same database need the new key file
    before they next start.

    \b
    Example: dgf admin vault rotate
    """
    with _client(config) as client:
        reply = client.meta.call("admin.vault.rotate")[0]
    click.echo(f"vault key rotated: {reply['patients']} patient key(s) re-wrapped, new key {reply['kek']}...")


@admin_group.command("erase")
@click.argument("patient", metavar="PSEUDONYM")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
@_run
def erase_cmd(patient: str, yes: bool, config: str | None) -> None:
    """Erase a patient for good (admin; audited): every file whose header names PSEUDONYM is
    removed and its objects deleted at the sites, then the patient's identity records and data
    key are destroyed.  Backups made before hold them still: let them expire.  The pseudonym
    is the PatientID of their files ('dgf_find "/DicomHeader[...]" --show PatientID').

    \b
    Example:
      dgf admin erase PD5GQ2XKMNZ4W7ABC
    """
    if not yes and not click.confirm(f"Erase every file and the identity of patient {patient}?", err=True):
        raise errors.UsageError("not confirmed; nothing was erased.")
    with _client(config) as client:
        reply, payload = client.meta.call("admin.erase", patient=patient)
        client._free(reply, payload)
    click.echo(f"patient {patient} erased: {reply['files']} file(s) removed, "
               f"{reply['identities']} identity record(s) destroyed")


@admin_group.group("audit", invoke_without_command=True)
@click.option("--limit", type=int, default=50, show_default=True, help="How many records.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines, oldest first, with each record's chain hash (for a SIEM, or "
                   "'| logger -t dgf-audit' for syslog).")
@click.option("--after", type=int, default=0, metavar="ID", help="With --json: the records after this id "
              "(export the whole log a page at a time).")
@config_option
@click.pass_context
@_run
def audit_cmd(ctx: click.Context, limit: int, as_json: bool, after: int, config: str | None) -> None:
    """Show the newest audit entries (identity releases, refusals, grants, deletes, changes).

    Records form a hash chain; 'dgf admin audit verify' checks it.

    \b
    Examples:
      dgf admin audit --limit 20
      dgf admin audit --json --after 0 --limit 10000 > audit.jsonl
    """
    if ctx.invoked_subcommand is not None:
        return
    with _client(config) as client:
        entries = client.audit_log(limit, after) if after else client.audit_log(limit)
    if as_json:
        for e in sorted(entries, key=lambda e: e["id"]):
            click.echo(json.dumps(e, ensure_ascii=False, sort_keys=True))
        return
    for e in entries:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        click.echo(f"{ts}\t{e['principal']}\t{e['action']}\t{e['outcome']}\t{e['target']}")


@audit_cmd.command("verify")
@config_option
@_run
def audit_verify(config: str | None) -> None:
    """Check the audit log's hash chain (admin): exit 0 when every record follows from the one
    before and the last is the chain's head; 6, naming the first broken record, when a record
    was changed, removed or moved, or records were cut off the end."""
    with _client(config) as client:
        r = client.audit_verify()
    legacy = f" ({r['legacy']} from before records were chained)" if r["legacy"] else ""
    if r["broken_at"] is None:
        click.echo(f"audit log intact: {r['records']} records{legacy}")
        return
    click.echo(f"audit log BROKEN at record {r['broken_at']}: {r['why']}", err=True)
    sys.exit(errors.IntegrityError.exit_code)


class _ReconGroup(click.Group):
    """'dgf recon SERIES_PATH ...' runs a reconstruction; 'dgf recon import ...' imports."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@main.group("recon", cls=_ReconGroup)
def recon_group() -> None:
    """Cone-beam CT reconstruction (FDK) near the data.

    \b
    dgf recon import PROJECTIONS.npy GEOMETRY.json --to /projects/scan1
    dgf recon /projects/scan1 --out /projects/scan1-fdk [--shape 256,256,256] [--filter hann]

    Each I/O site filters and back-projects the projections it holds; only partial volumes
    travel, and the sum is stored as a CT series with its provenance.
    """


@recon_group.command("import")
@click.argument("projections", type=_EXISTING_FILE)
@click.argument("geometry", type=_EXISTING_FILE)
@click.option("--to", "to", required=True, metavar="DIR", help="Archive directory for the projection series.")
@click.option("--patient-id", default="", help="Patient ID to record (de-identified on upload like any other).")
@click.option("--patient-name", default="", help="Patient name to record (de-identified on upload).")
@config_option
@_run
def recon_import(projections: str, geometry: str, to: str, patient_id: str, patient_name: str,
                 config: str | None) -> None:
    """Store a projection stack (.npy, shape projections x rows x columns) and its geometry
    (JSON: sid, sdd, detector_shape [nu, nv], pixel_size [du, dv], angles_deg, volume_shape,
    voxel_size, optional detector_offset and volume_origin; axes as RTK's) as a DICOM series."""
    import numpy as np

    from dgf.conebeam import Geometry

    g = Geometry.from_json(Path(geometry).read_text())
    try:
        stack = np.load(projections, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise errors.UsageError(f"{projections} is not a .npy array ({exc}).") from exc
    with _client(config, shared=False) as client:
        bar = _Bar(g.n_projections, "importing projections", unit="projection")
        try:
            report = client.recon_import(np.asarray(stack, dtype=np.float32), g, to,
                                         {"PatientID": patient_id, "PatientName": patient_name},
                                         progress=bar.update)
        finally:
            bar.close()
    for f in report.failed:
        click.echo(f"error: {f.item}: {f.reason}", err=True)
    click.echo(f"imported {report.uploaded} projection(s) to {to} ({_mb(report.bytes)})")
    if report.failed:
        sys.exit(errors.InvalidDicom.exit_code)


@recon_group.command("run")
@click.argument("series")
@click.option("--out", "out", required=True, metavar="DIR", help="Archive directory for the reconstructed series.")
@click.option("--shape", metavar="NX,NY,NZ", help="Volume size in voxels (same field of view).")
@click.option("--filter", "window", default="hann", show_default=True,
              type=click.Choice(["ram-lak", "shepp-logan", "cosine", "hamming", "hann"]))
@click.option("--replace", is_flag=True,
              help="Replace the series already in --out (removed once the new one is stored).")
@config_option
@_run
def recon_run(series: str, out: str, shape: str | None, window: str, replace: bool, config: str | None) -> None:
    """Reconstruct the projection series SERIES with FDK on the sites that hold it.

    An --out that already holds files is refused, unless --replace is given.  The slices inherit
    the identity of their projections: a clinician downloads them --identified with the patient's
    name, IDs and study attributes put back.
    """
    dims = None
    if shape:
        try:
            dims = tuple(int(v) for v in shape.split(","))
        except ValueError as exc:
            raise errors.UsageError(f"--shape must be NX,NY,NZ integers, got {shape!r}.") from exc
        if len(dims) != 3 or min(dims) <= 0:
            raise errors.UsageError(f"--shape must be three positive integers, got {shape!r}.")
    with _client(config, shared=False) as client:
        result = client.recon(series, out, dims, window,
                              progress=lambda line: click.echo(line, err=True), replace=replace)
    nx, ny, nz = result.geometry.volume_shape
    click.echo(f"reconstructed {nx}x{ny}x{nz} from {result.geometry.n_projections} projections on "
               f"{', '.join(result.sites)} in {result.seconds:.1f} s; {len(result.paths)} slices in {out}")


@main.group("dicom")
def dicom_group() -> None:
    """The archive as a DICOM node, for modalities and viewers (DIMSE)."""


@dicom_group.command("serve")
@click.option("--config", "config", required=True, type=_EXISTING_FILE, metavar="FILE",
              help="Gateway config with a [dicom] section (README: 'Speaking DICOM').")
@click.option("--ready-file", type=_FILE, help="Write HOST:PORT here once listening.")
@_run
def dicom_serve(config: str, ready_file: str | None) -> None:
    """Answer C-ECHO, C-STORE, C-FIND, C-GET and C-MOVE as the AE title CONFIG names, until
    SIGTERM or Ctrl-C.

    Each calling AE title acts as the dgf principal of the client config it is bound to
    ('callers'); any other is refused.  Stored instances are spooled (fsynced) before the
    modality is told they are safe, then de-identified and uploaded in batches as dgf_up does,
    once the modalities pause or the oldest has waited 'defer_upload_s' (default 30 seconds);
    a refused instance waits in SPOOL/failed beside its reason.  C-FIND answers from the header
    index; C-GET and C-MOVE send de-identified instances, or identified ones to the AE titles
    listed in 'identified' whose principal may see identity (audited).

    \b
    Example gateway.conf (client configs relative to it):
      [dicom]
      ae_title = DGF
      listen = 0.0.0.0:11112
      spool = /var/spool/dgf-dicom
      callers = CT_SCANNER=clinician.conf, READING=clinician.conf, RESEARCH=researcher.conf
      identified = READING
      destinations = READING=10.0.2.7:104
    """
    import logging
    import signal
    import threading

    from dgf.dimse import DicomConfig, Gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("pynetdicom", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = DicomConfig.load(config)
    gateway = Gateway(cfg)
    host, port = gateway.start()
    click.echo(f"DICOM AE {cfg.ae_title} listening on {host}:{port}; callers {', '.join(sorted(cfg.callers))}; "
               f"spool {cfg.spool}", err=True)
    if ready_file:
        Path(ready_file).write_text(f"{host}:{port}\n")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    gateway.stop()


@main.group("web")
def web_group() -> None:
    """The archive over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and the OHIF viewer."""


@web_group.command("serve")
@click.option("--config", "config", required=True, type=_EXISTING_FILE, metavar="FILE",
              help="Web config with a [web] section (README: 'DICOMweb and the viewer').")
@click.option("--ready-file", type=_FILE, help="Write HOST:PORT here once listening.")
@_run
def web_serve(config: str, ready_file: str | None) -> None:
    """Serve DICOMweb under /dicomweb and the OHIF viewer at /, until SIGTERM or Ctrl-C.

    Every request acts as the dgf principal its bearer token is bound to (dgf web token
    create): roles, grants and audit apply as on the CLI.  A browser signs in at /login with a
    token.  QIDO-RS answers from the header index; WADO-RS returns de-identified instances
    (identified ones for tokens made with --identified, when the principal may see identity);
    STOW-RS de-identifies and uploads as dgf_up does.  The viewer is fetched once with npm
    (about 50 MB) unless 'viewer = off'.

    \b
    Example web.conf (paths relative to it):
      [web]
      listen = 0.0.0.0:8443
      certificate = tls/web.crt
      private_key = tls/web.key
      tokens = web-tokens.json
      spool = /var/spool/dgf-web
      max_body_mb = 4096
    """
    import logging

    from dgf.web import WebConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    cfg = WebConfig.load(config)
    scheme = "https" if cfg.certificate else "http"

    def ready(host: str, port: int) -> None:
        click.echo(f"DICOMweb at {scheme}://{host}:{port}/dicomweb; viewer at {scheme}://{host}:{port}/ "
                   f"(sign in with a token from 'dgf web token create')", err=True)
        if ready_file:
            Path(ready_file).write_text(f"{host}:{port}\n")
    serve(cfg, ready)


@web_group.group("token")
def web_token() -> None:
    """Bearer tokens: each acts as the principal of one client config."""


@web_token.command("create")
@click.argument("name")
@click.option("--config", "config", required=True, type=_EXISTING_FILE, metavar="FILE",
              help="The web config whose token file gets the token.")
@click.option("--principal", "principal", required=True, type=_EXISTING_FILE,
              metavar="CLIENT_CONF", help="Client config (principal and key) the token acts as.")
@click.option("--identified", is_flag=True,
              help="WADO-RS returns identified instances (the principal must be allowed; audited).")
@_run
def web_token_create(name: str, config: str, principal: str, identified: bool) -> None:
    """Create token NAME and print it once (only its SHA-256 is kept).

    \b
      dgf web token create reading-room --config web.conf --principal clinician.conf --identified
      curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8042/dicomweb/studies
    """
    from dgf.web import Tokens, WebConfig

    click.echo(Tokens(WebConfig.load(config).tokens).create(name, Path(principal), identified))


@web_token.command("list")
@click.option("--config", "config", required=True, type=_EXISTING_FILE, metavar="FILE")
@_run
def web_token_list(config: str) -> None:
    """List tokens: name, principal config, identified, created."""
    from dgf.web import Tokens, WebConfig

    for t in Tokens(WebConfig.load(config).tokens).list():
        click.echo(f"{t.name}\t{t.principal}\t{'identified' if t.identified else 'de-identified'}\t{t.created}")


@web_token.command("revoke")
@click.argument("name")
@click.option("--config", "config", required=True, type=_EXISTING_FILE, metavar="FILE")
@_run
def web_token_revoke(name: str, config: str) -> None:
    """Revoke token NAME (a running server refuses it from its next request)."""
    from dgf.web import Tokens, WebConfig

    Tokens(WebConfig.load(config).tokens).revoke(name)
    click.echo(f"revoked {name}")


@main.group("local")
def local_group() -> None:
    """Run a whole federation on loopback (metaserver + two I/O sites) in one directory."""


@local_group.command("up")
@click.argument("directory", type=_DIR)
@_run
def local_up(directory: str) -> None:
    """Start (or restart) a local federation in DIRECTORY.

    Creates keys, a vault key and an SQLite database on first use, enrolls admin, clinician and
    researcher, and writes DIRECTORY/<principal>.conf for each.  Run on a federation where a
    server died, it starts the dead servers only; restarted servers keep their ports where free,
    so existing configs stay valid.
    """
    from dgf import local

    fed = local.up(Path(directory))
    restarted = "" if set(fed.started) == {"metaserver", *fed.sites} else f" (restarted {', '.join(fed.started)})"
    click.echo(f"federation up in {fed.root}: metaserver {fed.metaserver}, sites {', '.join(fed.sites)}{restarted}")
    click.echo(f"  try: export DGF_CONFIG={fed.config('clinician')}")


@local_group.command("down")
@click.argument("directory", type=_DIR)
@_run
def local_down(directory: str) -> None:
    """Stop the local federation in DIRECTORY (data stays)."""
    from dgf import local

    stopped = local.down(Path(directory))
    click.echo(f"stopped {', '.join(stopped) if stopped else 'nothing (not running)'}")


@local_group.command("status")
@click.argument("directory", type=_DIR)
@_run
def local_status(directory: str) -> None:
    """Tell which processes of the local federation in DIRECTORY run."""
    from dgf import local

    st = local.status(Path(directory))
    click.echo(f"metaserver address {st['metaserver']}")
    for name, p in st["processes"].items():
        click.echo(f"  {name:<12} pid {p['pid']:<8} {'running' if p['running'] else 'stopped'}")


def up_main() -> None:
    up_cmd(prog_name="dgf_up")


def down_main() -> None:
    down_cmd(prog_name="dgf_down")


def find_main() -> None:
    find_cmd(prog_name="dgf_find")

