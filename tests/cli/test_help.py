"""`p2psched --help` lists each command in a line that matches what the command does."""

from click.testing import CliRunner

from p2psched.cli.main import cli


def test_the_cancel_line_says_it_takes_several_ids_or_labels():
    # It said "Cancel a job." while `cancel` takes several ids, or --label.
    out = CliRunner().invoke(cli, ["--help"]).output
    [line] = [line for line in out.splitlines() if line.split()[:1] == ["cancel"]]
    assert line.split(None, 1)[1] == "Cancel jobs by id, or every unfinished job with --label."
