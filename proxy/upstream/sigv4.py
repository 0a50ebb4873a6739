"""AWS Signature Version 4 for the one call the proxy makes to AWS: GetAuthorizationToken.

A small signer instead of aiobotocore: one POST with a query string and an empty body needs
about forty lines, and botocore would bring a large dependency tree whose credential loading
blocks the event loop. Credentials come from the standard environment variables, else the
shared credentials file (``AWS_SHARED_CREDENTIALS_FILE`` or ``~/.aws/credentials``, profile
``AWS_PROFILE`` or ``default``). Instance roles (IMDS) and web identity are not read: use the
``command`` provider with ``aws codeartifact get-authorization-token`` where those are needed.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    access_key: str
    secret_key: str = ""
    session_token: str | None = None

    def __repr__(self) -> str:  # never print a secret, even in a traceback
        return f"AwsCredentials(access_key={self.access_key[:4]}…)"


def load_credentials(env: Mapping[str, str]) -> AwsCredentials:
    """The standard chain's first two links (blocking: reads a file; call from a thread)."""
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return AwsCredentials(
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN")
        )
    path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    profile = env.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser()
    if path.exists():
        parser.read(path)
    if parser.has_section(profile) and parser.has_option(profile, "aws_access_key_id"):
        section = parser[profile]
        return AwsCredentials(
            section["aws_access_key_id"],
            section.get("aws_secret_access_key", ""),
            section.get("aws_session_token"),
        )
    raise LookupError(
        f"no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or profile {profile!r} in {path}"
    )


def sign(
    method: str,
    url: str,
    *,
    region: str,
    service: str,
    credentials: AwsCredentials,
    body: bytes = b"",
    now: datetime.datetime | None = None,
    payload_hash: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The headers that sign the request (Authorization, X-Amz-Date, maybe the session token).

    S3 (storage/s3.py) passes ``payload_hash`` (a streamed body's is ``UNSIGNED-PAYLOAD``), which
    is then sent and signed as ``x-amz-content-sha256``, and ``extra`` headers to sign and send.
    """
    moment = now or datetime.datetime.now(datetime.UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    parts = urlsplit(url)
    host = parts.netloc
    headers = {"host": host, "x-amz-date": amz_date}
    headers |= {k.lower(): v for k, v in (extra or {}).items()}
    if payload_hash is not None:
        headers["x-amz-content-sha256"] = payload_hash
    if credentials.session_token:
        headers["x-amz-security-token"] = credentials.session_token
    pairs = sorted(parse_qsl(parts.query, keep_blank_values=True))
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            quote(parts.path or "/", safe="/-_.~"),
            query,
            "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers)),
            signed,
            payload_hash or hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    signature = _signature(canonical, amz_date, scope, region, service, credentials)
    out = {k: v for k, v in headers.items() if k not in {"host", "x-amz-date", "x-amz-security-token"}}
    out |= {
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        ),
        "X-Amz-Date": amz_date,
    }
    if credentials.session_token:
        out["X-Amz-Security-Token"] = credentials.session_token
    return out


def presign(
    url: str,
    *,
    region: str,
    service: str,
    credentials: AwsCredentials,
    expires: int,
    now: datetime.datetime | None = None,
) -> str:
    """A GET URL signed in its query string (S3's pre-signed URL), valid for ``expires`` seconds.

    It carries the access key id and a signature, never the secret key, and nothing of the
    proxy's own credentials: whoever holds it may GET this one object until it expires.
    """
    moment = now or datetime.datetime.now(datetime.UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    params |= {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{credentials.access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": "host",
    }
    if credentials.session_token:
        params["X-Amz-Security-Token"] = credentials.session_token
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
    path = quote(parts.path or "/", safe="/-_.~")
    canonical = "\n".join(["GET", path, query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"])
    signature = _signature(canonical, amz_date, scope, region, service, credentials)
    return f"{parts.scheme}://{parts.netloc}{path}?{query}&X-Amz-Signature={signature}"


def _signature(
    canonical: str, amz_date: str, scope: str, region: str, service: str, credentials: AwsCredentials
) -> str:
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + credentials.secret_key).encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()
