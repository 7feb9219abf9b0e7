"""``p2psched keygen --gossip``: create the cluster's gossip keyring file."""

from __future__ import annotations

import contextlib
import os
import sys

import click


@click.command()
@click.option("--gossip", "gossip", is_flag=True, required=True,
              help="Create a gossip (membership) encryption key: AES-256, base64, one per line.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the keyring file here (mode 0600) instead of standard output.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def keygen(gossip: bool, output: str | None, force: bool) -> None:
    """Create a gossip encryption key.

    Give the same file to every agent (--gossip-key). To rotate, add a new key line on
    every agent, move it to the top everywhere, then delete the old line.
    """
    from p2psched.membership.keyring import new_key_file_text

    text = new_key_file_text()
    if output is None:
        sys.stdout.write(text)
        return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(output, flags, 0o600)
    except FileExistsError:
        raise click.ClickException(f"{output} already exists; pass --force to replace it "
                                   "(agents using the old key will no longer understand this cluster)") from None
    except OSError as e:
        raise click.ClickException(f"cannot write the gossip key to {output}: {e.strerror or e}; "
                                   "pass -o with a file in an existing directory you can write to") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:  # a full disk: a cut key file is worse than none
        with contextlib.suppress(OSError):
            os.unlink(output)
        raise click.ClickException(f"cannot write the gossip key to {output}: {e.strerror or e}; "
                                   "free some space there or pass another -o") from None
    click.echo(f"wrote gossip key to {output} (mode 0600)", err=True)
