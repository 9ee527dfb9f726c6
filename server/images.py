"""Image parts of chat messages, for a model that reads images (`engine.images`): OpenAI's
`{"type": "image_url", "image_url": {"url": ...}}` (or the url as a plain string), read into the pixels the vision
tower takes (`models.vision.preprocess`).

A picture comes inline as a `data:` URL; by a link only as the server's `Media` policy allows, vLLM's flags:
`--allowed-media-domains` (http and https, each redirect checked too; `*`: any public address) and
`--allowed-local-media-path` (`file://` under that folder). With neither, links are refused with a 400 that says how
to send the picture: a server must not fetch whatever a client names (its own network, a cloud's metadata address),
and its hosts often reach nothing outside. For the same reason `*` reaches only global addresses: each connection
resolves its host itself and connects only to an address that is global (so a name that resolves, or is rebound, to
a private, loopback, link-local, reserved or NAT64-mapped private address is refused before any packet reaches it,
redirects included), proxies from the environment are not used, and a private host is fetched from only where the
flag names it. A redirect goes only to http or https."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from models import vision

IMAGE_PARTS = ("image_url",)


@dataclasses.dataclass(frozen=True)
class Media:
    """Where pictures may be fetched from: hosts for http(s) links (`*`: any public address; none: no links), a
    folder for `file://` links (None: none), the seconds and bytes one fetch may take in all, and the pictures one
    request may hold (the server's `--max-images`: more are refused before any is read)."""

    domains: tuple[str, ...] = ()
    local: str | None = None
    timeout: float = 10.0
    max_bytes: int = 20 << 20
    max_images: int = 32

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(d.lower().strip("[]") for d in self.domains))

    def allows(self, host: str | None) -> bool:
        """Whether a link to `host` may be fetched."""
        return "*" in self.domains or (host or "").lower() in self.domains


NO_MEDIA = Media()  # inline pictures only


def url_of(part: dict, where: str) -> str:
    """The URL of an `image_url` part (an object with `url`, or the string itself); else a `ValueError` naming
    `where` (the caller's 400)."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ValueError(f"{where}.image_url must be an object like {{'url': 'data:image/png;base64,...'}}")
    return url


def pixels(url: str, cfg: vision.VisionConfig, media: Media = NO_MEDIA) -> np.ndarray:
    """The preprocessed pixels `[3, S, S]` of the picture at `url` (inline, or fetched as `media` allows); else a
    `ValueError` saying why."""
    return vision.preprocess(vision.decode_image(_bytes(url, media)), cfg)


def _bytes(url: str, media: Media) -> bytes:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise ValueError("an image data: URL must be base64 (data:image/...;base64,...)")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ValueError(f"the image's base64 does not decode: {e}") from None
    shown = url if len(url) <= 60 else url[:57] + "..."
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file" and media.local is not None:
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"a file:// link names no other host ({shown!r})")
        return _local(urllib.parse.unquote(parsed.path), media)
    if parsed.scheme in ("http", "https") and media.domains:
        if "@" in parsed.netloc or "\\" in url:  # userinfo or a backslash: the host checked may not be the one reached
            raise ValueError(f"a picture's link may hold no user name or backslash ({shown!r})")
        if not media.allows(parsed.hostname):
            raise ValueError(f"this server fetches pictures from {', '.join(media.domains)} only, not {shown!r}")
        return _fetch(url, media)
    how = ("start it with --allowed-media-domains" if parsed.scheme in ("http", "https") else
           "start it with --allowed-local-media-path" if parsed.scheme == "file" else "")
    raise ValueError(f"this server does not fetch {shown!r}; send the picture inline as a data: URL "
                     f"(data:image/png;base64,...){' or ' + how if how else ''}")


def _local(path: str, media: Media) -> bytes:
    root = os.path.realpath(media.local)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise ValueError(f"file:// pictures must be under {media.local} (--allowed-local-media-path)")
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):  # a FIFO or a device would block the read
            raise ValueError("a file:// picture must be a regular file")
        with open(real, "rb") as f:
            data = f.read(media.max_bytes + 1)
    except OSError as e:
        raise ValueError(f"could not read the picture: {e.strerror}") from None
    return _bounded(data, media)


class _Checked(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a host the policy allows."""

    def __init__(self, media: Media):
        """A handler for `media`'s hosts."""
        self.media = media

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        """The redirected request, or a `ValueError` where it leaves the allowed hosts (or http and https)."""
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise ValueError("the picture's link redirects to a scheme other than http or https")
        if not self.media.allows(urllib.parse.urlparse(newurl).hostname):
            raise ValueError("the picture's link redirects to a host this server does not fetch from")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses reached through a NAT64 gateway


def _global(address: str) -> bool:
    """Whether an IP address is global, the IPv4 one inside an IPv6 form (mapped, NAT64, 6to4, Teredo) too."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6:
        inner = (ip.ipv4_mapped or ip.sixtofour or (ip.teredo or (None, None))[1]
                 or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None))
        if inner is not None and not inner.is_global:
            return False
    return ip.is_global


def _connect_global(address: tuple[str, int], timeout: float | None = None, source_address=None, *args,
                    **kwargs) -> socket.socket:
    """`socket.create_connection`, to the host's first global address (the name resolved here, so the address
    checked is the one connected to); a `ValueError` where it has none."""
    host, port = address
    found = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    public = [a for a in found if _global(a)]
    if not public:
        raise ValueError("this server fetches pictures from public addresses only (--allowed-media-domains '*'); "
                         "a private host must be named in the flag")
    return socket.create_connection((public[0], port), timeout, source_address, *args, **kwargs)


def _checked_connection(base: type, media: Media) -> type:
    """`base` (http.client's HTTP or HTTPS connection) that connects only to global addresses (`_connect_global`;
    TLS still checks the host's name), unless the host is one the policy names."""

    class Connection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.host.lower().strip("[]") not in media.domains:
                self._create_connection = _connect_global

    return Connection


def _opener(media: Media) -> urllib.request.OpenerDirector:
    """An opener that follows redirects only to allowed hosts; for `*`, one that connects directly (no proxy) and
    only to global addresses (`_connect_global`)."""
    if "*" not in media.domains:
        return urllib.request.build_opener(_Checked(media))
    http_conn, https_conn = (_checked_connection(c, media) for c in (http.client.HTTPConnection,
                                                                      http.client.HTTPSConnection))

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req)

    class Secure(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req, context=ssl.create_default_context())

    return urllib.request.build_opener(_Checked(media), urllib.request.ProxyHandler({}), Plain(), Secure())


def _fetch(url: str, media: Media) -> bytes:
    opener = _opener(media)
    deadline = time.monotonic() + media.timeout  # for the whole body: a server trickling bytes is cut off
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "sparkler"}),
                         timeout=media.timeout) as r:
            data = bytearray()
            while chunk := r.read(1 << 16):
                data += chunk
                _bounded(data, media)
                if time.monotonic() > deadline:
                    raise ValueError(f"the picture took over {media.timeout:g} s to arrive")
            return bytes(data)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # HTTP errors, timeouts, bad replies
        raise ValueError(f"could not fetch the picture: {getattr(e, 'reason', None) or e}") from None


def _bounded(data: bytes, media: Media) -> bytes:
    if len(data) > media.max_bytes:
        raise ValueError(f"the picture is over {media.max_bytes >> 20} MiB")
    return data
