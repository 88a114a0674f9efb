"""The TLS and token flags of every command that calls a router, and the one place the token's
environment variable is read."""

from __future__ import annotations

import argparse
import os

TOKEN_ENV = "MOE_SERVE_TOKEN"


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """TLS and token flags of every command that calls a router."""
    p.add_argument("--ca-cert", metavar="PEM", help="CA certificate that signed the server's (implies TLS)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root CAs (when no --ca-cert)")
    p.add_argument("--client-cert", metavar="PEM", help="client certificate, for a server that wants one (mutual TLS)")
    p.add_argument("--client-key", metavar="PEM", help="private key of --client-cert")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV}; the variable keeps it out of `ps`)")


def client_credentials(args: argparse.Namespace):
    """The `ClientCredentials` of the flags; the one place `MOE_SERVE_TOKEN` is read."""
    from router_service.security import ClientCredentials

    token = args.token or os.environ.get(TOKEN_ENV) or None
    return ClientCredentials(args.ca_cert, args.client_cert, args.client_key, token.strip() if token else None, args.tls)
