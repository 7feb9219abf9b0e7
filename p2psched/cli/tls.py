"""``p2psched ca init`` and ``p2psched cert issue``: the cluster CA for mutual TLS between agents."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"p2psched: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def ca() -> None:
    """Create the cluster certificate authority."""


@ca.command("init")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for ca.pem and ca.key (keep ca.key off the agents' hosts if you can).")
@click.option("--name", default="p2psched cluster CA", show_default=True, help="The CA's common name.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True, help="Validity.")
def ca_init(out_dir: Path, name: str, days: int) -> None:
    """Create a new cluster CA in --out."""
    from p2psched.security.tls import TLSSetupError, init_ca

    try:
        cert, key = init_ca(out_dir, common_name=name, days=days)
    except TLSSetupError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write the CA to {e.filename or out_dir}: {e.strerror or e}; "
              "pass --out with a directory you can create and write to")
    click.echo(f"wrote {cert} and {key} (private, mode 0600)")
    click.echo(f"next, for each agent: p2psched cert issue NODE_ID --ca {out_dir} --out DIR")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cert() -> None:
    """Issue node certificates from the cluster CA."""


@cert.command("issue")
@click.argument("node_id")
@click.option("--ca", "ca_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="Directory holding ca.pem and ca.key.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for NODE_ID.pem, NODE_ID.key and a copy of ca.pem: the agent's TLS directory.")
@click.option("--host", "hosts", multiple=True, help="Extra DNS name or IP for the certificate (repeatable).")
@click.option("--days", type=click.IntRange(1, 36500), default=825, show_default=True, help="Validity.")
def cert_issue(node_id: str, ca_dir: Path, out_dir: Path, hosts: tuple[str, ...], days: int) -> None:
    """Issue a certificate naming NODE_ID, signed by the CA in --ca."""
    from p2psched.security.tls import TLSSetupError, issue_node_cert

    _check_ca(ca_dir)
    try:
        cert_path, key_path = issue_node_cert(node_id, ca_dir, out_dir, hosts=hosts, days=days)
    except TLSSetupError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {e.filename or out_dir}: {e.strerror or e}; pass --out with a directory you can "
              "create and write to")
    except (ValueError, TypeError) as e:  # what _check_ca did not foresee in the CA's files
        _fail(f"cannot use the CA in {ca_dir}: {e}; give --ca the directory 'p2psched ca init --out' wrote")
    click.echo(f"wrote {cert_path} and {key_path} (private, mode 0600) for node {node_id}")


def _check_ca(ca_dir: Path) -> None:
    """Fail naming the file when --ca's ca.pem or ca.key cannot be read as 'ca init' writes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from p2psched.security.tls import CA_CERT, CA_KEY

    fix = "give --ca the directory 'p2psched ca init --out' wrote, or create a CA with 'p2psched ca init --out DIR'"
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for path in (cert_path, key_path):
        if not path.exists():
            continue  # issue_node_cert says that no CA is there
        try:
            data = path.read_bytes()
        except OSError as e:
            _fail(f"cannot read {path}: {e.strerror or e}; {fix}")
        try:
            if path == cert_path:
                x509.load_pem_x509_certificate(data)
            else:
                serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:  # TypeError: a key encrypted with a passphrase
            what = "a PEM certificate" if path == cert_path else "an unencrypted PEM private key"
            reason = str(e).split(". See ")[0]  # cryptography appends a link to its FAQ
            _fail(f"{path} is not {what} ({reason}); {fix}")
