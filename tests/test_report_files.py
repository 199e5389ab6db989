"""Writing a report directory safely: what force may delete, kills mid-write, leftovers,
symlinked targets and unwritable locations. The page itself is tested in test_report.py;
here ``render_html`` is replaced by a one-line page so that no model is fitted."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ppl_em.report import files, writer

STOP_AT = "PPL_EM_REPORT_STOP_AT"  # the documented test seam (ppl_em/report/files.py)


class Stub:
    """What write_report reads from a Comparison besides the rendered page."""

    def __init__(self, tag):
        self.tag = tag

    def to_json(self):
        return {"model_name": "stub", "tag": self.tag}


def page(comparison, data=None):
    return f"<!DOCTYPE html><html><title>ppl_em report: {comparison.tag}</title></html>"


@pytest.fixture(autouse=True)
def one_line_page(monkeypatch):
    monkeypatch.setattr(writer, "render_html", page)


def write(out, tag, force=False):
    return writer.write_report(Stub(tag), out, force=force)


def tag_of(out):
    return json.loads((out / "report.json").read_text())["tag"]


def tree(root):
    """Every path under ``root`` (symlinks not followed) with its bytes or link target."""
    found = {}
    for top, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(top, name)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    found[path] = ("file", fh.read())
            else:
                found[path] = ("dir", None)
    return found


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- 1. what force may delete


def test_force_refuses_a_directory_named_like_a_report_file(tmp_path):
    out = tmp_path / "rep"
    (out / "index.html").mkdir(parents=True)
    (out / "index.html" / "notes.txt").write_text("keep me")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError) as caught:
        write(out, "new", force=True)
    message = str(caught.value)
    assert str(out / "index.html") in message and "even with --force" in message
    assert "Move" in message and "another output directory" in message
    assert tree(tmp_path) == before


def _hand_written(out):
    out.mkdir()
    (out / "index.html").write_text("<html></html>")
    return out / "index.html"


def _edited_page(out):
    write(out, "old")
    page = out / "index.html"
    page.write_text(page.read_text().replace("</title>", "</title><p>my notes</p>"))
    return page


def _appended_page(out):
    write(out, "old")
    with (out / "index.html").open("a") as fh:
        fh.write("<p>my notes</p>")
    return out / "index.html"


def _edited_json(out):
    write(out, "old")
    (out / "report.json").write_text('{"tag": "mine"}')
    return out / "report.json"


def _json_links_outside(out):
    write(out, "old")
    mine = out.parent / "mine.json"
    mine.write_text("{}")
    (out / "report.json").unlink()
    (out / "report.json").symlink_to(mine)
    return out / "report.json"


def _nested_file(out):
    write(out, "old")
    (out / "figures").mkdir()
    (out / "figures" / "fig.png").write_bytes(b"png")
    return out / "figures" / "fig.png"


@pytest.mark.parametrize(
    "make",
    [_hand_written, _edited_page, _appended_page, _edited_json, _json_links_outside, _nested_file],
)
def test_force_refuses_anything_the_report_did_not_write(tmp_path, make):
    out = tmp_path / "rep"
    offending = make(out)
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="even with --force") as caught:
        write(out, "new", force=True)
    assert str(offending) in str(caught.value)
    assert tree(tmp_path) == before  # nothing deleted, nothing left beside it


def test_force_replaces_its_own_report_and_an_empty_directory(tmp_path):
    out = tmp_path / "rep"
    write(out, "old")
    with pytest.raises(FileExistsError, match=r"rep already exists.*--force"):
        write(out, "new")
    assert write(out, "new", force=True) == out
    assert tag_of(out) == "new" and sorted(p.name for p in out.iterdir()) == [
        "index.html",
        "report.json",
    ]
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", "new", force=True)
    assert tag_of(tmp_path / "empty") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "rep"]


def test_force_replaces_a_report_written_before_manifests(tmp_path):
    # Reports written by earlier versions (e.g. reports/coin in the repository) carry
    # no manifest; they are recognised by their page header and report.json fields.
    out = tmp_path / "coin"
    out.mkdir()
    (out / "index.html").write_text(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>ppl_em report: coin</title></head><body></body></html>"
    )
    (out / "report.json").write_text(json.dumps({"model_name": "coin", "em": {}, "table": {}}))
    write(out, "new", force=True)
    assert tag_of(out) == "new"


def test_a_file_added_during_the_replacement_is_kept(tmp_path, monkeypatch):
    # Between the check and the swap someone saves a file into the old report: the
    # new report goes in, and the old directory is kept (and named) instead of deleted.
    out = tmp_path / "rep"
    write(out, "old")
    exchange = files._exchange

    def late_save_then_exchange(a, b):
        (b / "late.txt").write_text("saved just now")
        return exchange(a, b)

    monkeypatch.setattr(files, "_exchange", late_save_then_exchange)
    with pytest.raises(FileExistsError, match=r"late\.txt") as caught:
        write(out, "new", force=True)
    kept = [p for p in tmp_path.iterdir() if p.name != "rep"]
    assert tag_of(out) == "new" and len(kept) == 1 and str(kept[0]) in str(caught.value)
    assert (kept[0] / "late.txt").read_text() == "saved just now"
    monkeypatch.setattr(files, "_exchange", exchange)
    write(out, "next", force=True)  # the next run leaves the user's file alone too
    assert (kept[0] / "late.txt").exists()


# ---------------------------------------------------------------- 2. interruptions

CHILD = textwrap.dedent(
    """
    import sys
    from ppl_em.report import writer

    class Stub:
        def __init__(self, tag):
            self.tag = tag

        def to_json(self):
            return {"model_name": "stub", "tag": self.tag}

    def page(comparison, data=None):  # the same page as the tests' own
        return f"<!DOCTYPE html><html><title>ppl_em report: {comparison.tag}</title></html>"

    writer.render_html = page
    if sys.argv[3] == "no-exchange":  # a file system without an atomic exchange
        from ppl_em.report import files

        files._exchange = lambda a, b: False
    writer.write_report(Stub(sys.argv[2]), sys.argv[1], force=True)
    """
)


def kill_at(step, out, tag, tmp_path, mode="exchange"):
    """Run write_report(force=True) in a child, let it stop itself at ``step``, SIGKILL it."""
    env = {**os.environ, STOP_AT: step}
    with (tmp_path / "child.err").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(out), tag, mode], env=env, stderr=err
        )
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
    stderr = (tmp_path / "child.err").read_text()
    assert os.WIFSTOPPED(status), f"the writer never stopped at {step!r}:\n{stderr}"
    assert f"stopped at report step {step!r}" in stderr
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    "step, survivor",
    [("tmp-partial", "old"), ("tmp-complete", "old"), ("swapped", "new")],
)
def test_kill_during_force_replacement_leaves_a_whole_report(tmp_path, step, survivor):
    reports = tmp_path / "reports"
    out = reports / "rep"
    write(out, "old")
    kill_at(step, out, "new", tmp_path)
    # Read straight from disk, before any later run could repair anything.
    assert tag_of(out) == survivor
    assert (out / "index.html").read_text().startswith(page(Stub(survivor)))
    assert files.foreign_paths(out) == []  # whole: every file as its manifest lists it
    leftovers = sorted(p.name for p in reports.iterdir() if p.name != "rep")
    assert len(leftovers) == 1 and leftovers[0].startswith(".rep.tmp-")
    # The next run removes its own leftover and replaces the surviving report.
    write(out, "next", force=True)
    assert tag_of(out) == "next" and sorted(p.name for p in reports.iterdir()) == ["rep"]


def test_kill_during_a_first_write_leaves_no_target_and_next_run_cleans(tmp_path):
    reports = tmp_path / "reports"
    out = reports / "rep"
    kill_at("tmp-complete", out, "new", tmp_path)
    assert not out.exists() and len(list(reports.iterdir())) == 1
    write(out, "next")  # no --force needed: nothing was ever at the target
    assert sorted(p.name for p in reports.iterdir()) == ["rep"]


def test_kill_between_renames_without_exchange_is_repaired_by_next_run(tmp_path):
    # Without renameat2's exchange the old report is moved aside before the new one
    # moves in; a kill in between leaves no target, and the next run puts it back.
    reports = tmp_path / "reports"
    out = reports / "rep"
    write(out, "old")
    kill_at("old-moved", out, "new", tmp_path, mode="no-exchange")
    assert not out.exists()
    with pytest.raises(FileExistsError, match="already exists"):
        writer.check_target(out, force=False)
    assert tag_of(out) == "old" and sorted(p.name for p in reports.iterdir()) == ["rep"]


def _report_files(path, tag):
    path.mkdir()
    (path / "report.json").write_text(json.dumps({"tag": tag}))
    (path / "index.html").write_text(f"<html>{tag}</html>")


def test_leftovers_of_a_killed_older_writer_are_repaired(tmp_path):
    # What the previous writer left when killed between its two renames: the old
    # report under .rep.old-PID, the new one under .rep.tmp-XXXXXXXX, no target.
    out = tmp_path / "rep"
    _report_files(tmp_path / f".rep.old-{dead_pid()}", "old")
    _report_files(tmp_path / ".rep.tmp-k2j4_x9q", "new")
    with pytest.raises(FileExistsError, match="already exists"):
        write(out, "next")
    assert tag_of(out) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_leftovers_that_are_not_ours_are_left_alone(tmp_path):
    out = tmp_path / "rep"
    dead = tmp_path / f".rep.tmp-{dead_pid()}-abc"
    dead.mkdir()
    (dead / "notes.txt").write_text("not a report file")
    other = tmp_path / f".other.tmp-{dead_pid()}-abc"
    _report_files(other, "other target")
    live = subprocess.Popen(["sleep", "60"])
    try:
        running = tmp_path / f".rep.tmp-{live.pid}-abc"  # a concurrent run, still writing
        _report_files(running, "in progress")
        before = tree(tmp_path)
        write(out, "new")
    finally:
        live.kill()
        live.wait()
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(str(out))} == before


# ---------------------------------------------------------------- 3. symlinked targets


def test_force_through_a_symlink_replaces_the_report_it_points_to(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "rep"
    link = tmp_path / "latest"
    write(real, "old")
    link.symlink_to(real)
    with pytest.raises(FileExistsError, match="already exists"):
        write(link, "new")
    assert write(link, "new", force=True) == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert tag_of(real) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "real"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["rep"]


def test_force_through_a_symlink_checks_the_directory_it_points_to(tmp_path):
    real = tmp_path / "mine"
    real.mkdir()
    (real / "thesis.tex").write_text("keep me")
    link = tmp_path / "rep"
    link.symlink_to(real)
    with pytest.raises(FileExistsError, match="even with --force") as caught:
        write(link, "new", force=True)
    assert str(real / "thesis.tex") in str(caught.value) and str(link) in str(caught.value)
    assert (real / "thesis.tex").read_text() == "keep me" and link.is_symlink()


# ---------------------------------------------------------------- 5. unwritable locations


def test_check_target_refuses_a_path_under_a_regular_file(tmp_path):
    (tmp_path / "data.csv").write_text("1\n")
    out = tmp_path / "data.csv" / "reports" / "rep"
    with pytest.raises(NotADirectoryError) as caught:
        writer.check_target(out, force=False)
    message = str(caught.value)
    assert str(out) in message and f"{tmp_path / 'data.csv'} is not a directory" in message


def test_check_target_refuses_a_location_nothing_can_be_created_in(tmp_path):
    # /proc refuses new entries even to root, unlike a chmod-ed directory.
    out = "/proc/ppl-em-report"
    with pytest.raises(OSError, match=r"cannot create .*/proc/ppl-em-report.* in /proc") as c:
        writer.check_target(out, force=True)
    assert "writable" in str(c.value)


def read_only_dir(path):
    """``path`` made mode 0555; skip where this user may write there anyway (root)."""
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").touch()
    except PermissionError:
        return path
    (path / "probe").unlink()
    path.chmod(0o755)
    pytest.skip("this user may write into a mode-0555 directory (root with CAP_DAC_OVERRIDE)")


def test_check_target_refuses_a_read_only_directory(tmp_path):
    locked = read_only_dir(tmp_path / "locked")
    try:
        with pytest.raises(PermissionError, match=f"in {locked}"):
            writer.check_target(locked / "rep", force=False)
    finally:
        locked.chmod(0o755)
