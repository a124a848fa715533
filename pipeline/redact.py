"""Secrets never written: what looks like one, and the text or setting without it.

Every place the job writes or prints something a user gave it (logs, error rows, commit
markers, run records, Parquet footers, the variant and config hashes, messages) goes
through here, so one module decides what a secret looks like:

* in a URL: credentials in the authority (``user:pass@``) and secret-looking query values
  of an HTTP(S) URL (:func:`uri`; an object store's key is literal, ``?`` and all);
* in a setting: a text value under a key whose name says secret, word by word
  (:func:`looks_secret`: ``api_key``, ``hub_token`` are; ``tokenizer``, ``author`` are not);
* in a message: every URL in it (:func:`text`), and the values known to be secret
  (:func:`scrub`, with :func:`secrets_in`).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

MASK = "***"

# --------------------------------------------------------------------------- URLs and text

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@]+)@")
# Query parameters whose values are masked in a URL shown or stored. (A recording's id is
# made from its URL as shown: widening this list renames recordings whose URLs it masks.)
_SECRET_QUERY = re.compile(r"(?i)(signature|token|secret|key|credential|sig|password)")
# Broader, for checkpoint URIs and for values scrubbed out of messages.
_SCRUBBED_QUERY = re.compile(r"(?i)(signature|token|secret|key|credential|sig|password|auth"
                             r"|x-amz-|x-goog-)")
# Stores whose keys are literal: `?` is a character of the key there, not a query.
_LITERAL_KEYS = ("s3", "s3a", "gs", "gcs", "file", "local", "memory")
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def uri(value: str, *, keep: Collection[str] = ()) -> str:
    """A URL without the credentials embedded in it (``user:pass@``, and secret-looking
    query values of an HTTP(S) URL: an object store's key is literal, ``?`` and all). A
    plain path, as it is. Query parameters named in ``keep`` (any case) are shown whatever
    their name: they name the object, not a credential (``input.name_params``)."""
    if "://" not in value:
        return value
    value = _USERINFO.sub(rf"\1{MASK}@", value)
    masked = masked_params(value, keep)
    if masked:
        base, _, query = value.partition("?")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        value = base + "?" + "&".join(f"{k}={MASK if k in masked else v}" for k, v in pairs)
    return value


def masked_params(value: str, keep: Collection[str] = ()) -> dict[str, str]:
    """The query parameters :func:`uri` masks in ``value``, with their values."""
    if "://" not in value or "?" not in value or not has_query(value):
        return {}
    kept = {k.lower() for k in keep}
    return {k: v for k, v in urllib.parse.parse_qsl(value.partition("?")[2],
                                                     keep_blank_values=True)
            if _SECRET_QUERY.search(k) and k.lower() not in kept}


def checkpoint_uri(value: str) -> str:
    """A checkpoint's URI as the job shows and records it (``WeightsInfo.uri``, in
    provenance): a password in the authority (the user name kept) and every query value
    whose name looks secret (:func:`secrets_in`'s broader list) masked, the query
    re-encoded. It also keys the weights cache (``models.weights``), so it must not change
    (it differs from :func:`uri`, which names recordings, for the same reason)."""
    parts = urllib.parse.urlsplit(value)
    if not parts.scheme or len(parts.scheme) == 1:  # plain path (or a Windows drive)
        return value
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    query = urllib.parse.urlencode(
        [(k, MASK if _SCRUBBED_QUERY.search(k) else v)
         for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def has_query(value: str) -> bool:
    """Whether ``?`` may start a query in a URL: anywhere but in an object store's key
    (a chained or unknown URL is read as having one, so its secrets stay masked)."""
    return value.strip().partition("://")[0].lower() not in _LITERAL_KEYS


def text(message: str) -> str:
    """:func:`uri` applied to every URL inside a message (errors quote what failed)."""
    return _URL_IN_TEXT.sub(lambda m: uri(m.group(0)), message)


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside ``value``, walking mappings, lists and tuples (to look for secrets
    in options and runtime environments)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings_in(item)


def secrets_in(url: str, options: Mapping[str, Any] | None) -> list[str]:
    """The strings a message about ``url`` must never show: its password, its secret-looking
    query values, every text value of its storage options (4 characters or more)."""
    parts = urllib.parse.urlsplit(url)
    found = [parts.password or ""]
    found += [v for k, v in urllib.parse.parse_qsl(parts.query) if _SCRUBBED_QUERY.search(k)]
    found += list(strings_in(options or {}))
    return [s for s in found if len(s) >= 4]


def scrub(message: str, secrets: Iterable[str]) -> str:
    """``message`` with each of ``secrets`` masked."""
    for secret in secrets:
        message = message.replace(secret, MASK)
    return message


# --------------------------------------------------------------------------- settings

SECRET_KEY_PARTS = ("secret", "token", "password", "passwd", "passphrase", "key",
                    "credential", "auth", "session")


def looks_secret(key: str) -> bool:
    """Whether a setting's name says its value is a secret, judged word by word
    (``api_key``, ``hub_token``, ``sessionToken``, ``aws_secret_access_key``,
    ``credentials``, ``connection_string`` are; ``tokenizer``, ``author``, ``keep_n`` and
    ``anon`` are not): a name that only contains a secret word (``tokenizer``) names a
    setting that changes the embeddings, and must stay in the variant and config hashes."""
    lowered = key.lower()
    if lowered in ("anon", "key_prefix"):
        return False
    if "connectionstring" in re.sub(r"[^a-z0-9]", "", lowered):
        return True
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    for word in words:
        word = word.rstrip("0123456789")  # HF_TOKEN2, oauth2
        singular = word.removesuffix("s")  # apikeys, hubtokens
        if word in SECRET_KEY_PARTS or singular in SECRET_KEY_PARTS:
            return True
        if singular.endswith(("key", "token", "secret", "password", "passwd", "auth")):  # apikey
            return True
        if (word.startswith(("auth", "session", "credential", "secret", "passw"))  # sessionid
                and word not in ("author", "authors")):
            return True
    return False


def settings(value: Any) -> Any:
    """Copy of a config mapping with every secret-looking value replaced.

    A text value under a key whose name contains a secret word (``secret``, ``token``,
    ``key``...), at any depth (storage options, a plugin's options), becomes ``"***"``;
    numbers stay (``max_tokens: 8`` is no secret, and must still change the config hash).
    URIs with inline credentials (``s3://KEY:SECRET@bucket``) lose them.
    """
    if isinstance(value, Mapping):
        return {k: MASK if isinstance(v, str) and looks_secret(str(k)) else settings(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [settings(v) for v in value]
    if isinstance(value, str):
        return uri(value)
    return value


def variant_options(options: Mapping[str, Any], not_in_variant: Collection[str] = ()) -> Any:
    """A model's options as its variant records and hashes them, never holding a secret.

    Options the backbone declares irrelevant to its embeddings (a plugin's
    ``secret_options``: a hub token) are recorded as ``"***"``, so a new token is no new
    variant. Other text under a secret-looking name is recorded as a salted, slow
    fingerprint (PBKDF2), not left out: such a name may well change the embeddings
    (``token_pooling: mean`` vs ``scaled``), and two values must not share a variant.
    Inline credentials in URIs are dropped, as everywhere.
    """
    def walk(value: Any, key: str | None) -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str) and key is not None and looks_secret(key):
            digest = hashlib.pbkdf2_hmac("sha256", value.encode(), b"embed-archive variant",
                                         100_000)
            return f"pbkdf2:{digest.hex()[:32]}"
        return uri(value) if isinstance(value, str) else value

    return {k: MASK if k in not_in_variant else walk(v, str(k)) for k, v in options.items()}
