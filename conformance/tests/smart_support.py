"""Helpers for the SMART-on-FHIR tests (test_smart.py, test_smart_browser.py).

Everything here speaks the HTTP contract of src/auth/CONTRACT.md to the `--auth smart` server
that run.sh starts (SMART_BASE, SMART_ADMIN_TOKEN). Keys, JWS and PKCE are made here with
`cryptography` and the standard library; nothing is shared with the server's code.
"""
import base64
import hashlib
import html.parser
import http.server
import json
import os
import queue
import secrets
import struct
import threading
import time
import urllib.parse
import uuid
import zlib

import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

FHIR_JSON = "application/fhir+json"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# PKCE (RFC 7636, S256)


def pkce_pair():
    verifier = b64u(secrets.token_bytes(48))  # 64 characters of [A-Za-z0-9_-]
    challenge = b64u(hashlib.sha256(verifier.encode("ascii")).digest())
    return verifier, challenge


def authorize_url(config, client_id, redirect_uri, scope, aud, challenge, state, **extra):
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "aud": aud,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    params = {k: v for k, v in params.items() if v is not None}
    return config["authorization_endpoint"] + "?" + urllib.parse.urlencode(params)


def query_of(url):
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True))


# ---------------------------------------------------------------------------------------------
# ES384 client key and a hand-made JWS (RFC 7515 compact form, RFC 7518 section 3.4 signature)


class Es384Key:
    def __init__(self):
        self.private = ec.generate_private_key(ec.SECP384R1())
        nums = self.private.public_key().public_numbers()
        x, y = nums.x.to_bytes(48, "big"), nums.y.to_bytes(48, "big")
        # RFC 7638 thumbprint as kid: members in lexicographic order, no whitespace.
        thumb = json.dumps({"crv": "P-384", "kty": "EC", "x": b64u(x), "y": b64u(y)}, separators=(",", ":"))
        self.kid = b64u(hashlib.sha256(thumb.encode("ascii")).digest())
        self.public_jwk = {
            "kty": "EC",
            "crv": "P-384",
            "x": b64u(x),
            "y": b64u(y),
            "kid": self.kid,
            "alg": "ES384",
            "use": "sig",
            "key_ops": ["verify"],
        }

    def sign_jws(self, claims: dict, typ="JWT") -> str:
        header = {"alg": "ES384", "typ": typ, "kid": self.kid}
        signing_input = (b64u(json.dumps(header, separators=(",", ":")).encode())
                         + "." + b64u(json.dumps(claims, separators=(",", ":")).encode()))
        der = self.private.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        # JWS wants the raw fixed-width r || s, not the DER sequence cryptography returns.
        return signing_input + "." + b64u(r.to_bytes(48, "big") + s.to_bytes(48, "big"))


def client_assertion(key: Es384Key, client_id, token_endpoint, lifetime=240):
    now = int(time.time())
    return key.sign_jws({
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "exp": now + lifetime,
        "iat": now,
        "jti": str(uuid.uuid4()),
    })


def jwt_parts(token):
    header, payload, signature = token.split(".")
    return json.loads(b64u_decode(header)), json.loads(b64u_decode(payload)), signature


def verify_rs256(token, jwks):
    """Checks an RS256 JWS against the RSA key with its kid in `jwks`; returns its claims."""
    header, claims, signature = jwt_parts(token)
    assert header["alg"] == "RS256", header
    keys = [k for k in jwks["keys"] if k.get("kty") == "RSA" and k.get("kid") == header.get("kid")]
    assert keys, f"no RSA key with kid {header.get('kid')!r} in the jwks: {jwks}"
    k = keys[0]
    public = rsa.RSAPublicNumbers(int.from_bytes(b64u_decode(k["e"]), "big"),
                                  int.from_bytes(b64u_decode(k["n"]), "big")).public_key()
    signing_input = token.rsplit(".", 1)[0].encode("ascii")
    public.verify(b64u_decode(signature), signing_input, padding.PKCS1v15(), hashes.SHA256())  # raises if bad
    return claims


# ---------------------------------------------------------------------------------------------
# The admin API and a backend-services client (to create the patients the tests log in as)


class Admin:
    def __init__(self, base, token):
        self.base = base
        self.http = requests.Session()
        self.http.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/json"})

    def post(self, path, body):
        r = self.http.post(self.base + path, json=body)
        assert r.status_code == 201, f"POST {path}: {r.status_code} {r.text}"
        return r.json()

    def register_client(self, name, auth_method, redirect_uris, scope=None, jwks=None):
        body = {"client_name": name, "redirect_uris": redirect_uris, "token_endpoint_auth_method": auth_method}
        if scope is not None:
            body["scope"] = scope
        if jwks is not None:
            body["jwks"] = jwks
        client = self.post("/admin/auth/clients", body)
        assert client.get("client_id"), client
        return client

    def add_user(self, username, password, fhir_user):
        return self.post("/admin/auth/users", {"username": username, "password": password, "fhirUser": fhir_user})


class Backend:
    """A private_key_jwt client (SMART Backend Services) with an ES384 key of its own."""

    def __init__(self, admin: Admin, config):
        self.key = Es384Key()
        self.token_endpoint = config["token_endpoint"]
        self.base = admin.base
        # The CLI marks --redirect-uri as required, so a (never used) one is registered here too.
        self.client_id = admin.register_client(
            unique("conformance-backend"), "private_key_jwt", ["http://127.0.0.1/unused-backend-redirect"],
            scope="system/*.cruds", jwks={"keys": [self.key.public_jwk]})["client_id"]

    def token(self, scope="system/*.cruds"):
        r = requests.post(self.token_endpoint, data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": client_assertion(self.key, self.client_id, self.token_endpoint),
        })
        assert r.status_code == 200, f"client_credentials: {r.status_code} {r.text}"
        body = r.json()
        assert body["token_type"].lower() == "bearer" and body["access_token"], body
        return body["access_token"]

    def session(self, scope="system/*.cruds"):
        s = requests.Session()
        s.headers.update({"Authorization": f"Bearer {self.token(scope)}", "Accept": FHIR_JSON,
                          "Content-Type": FHIR_JSON})
        return s

    def create(self, resource):
        r = self.session().post(f"{self.base}/{resource['resourceType']}", data=json.dumps(resource))
        assert r.status_code == 201, f"create {resource['resourceType']}: {r.status_code} {r.text}"
        return r.json()

    def read(self, ref):
        r = self.session().get(f"{self.base}/{ref}")
        assert r.status_code == 200, f"read {ref}: {r.status_code} {r.text}"
        return r.json()


def fhir_get(base, path, token):
    return requests.get(f"{base}/{path}", headers={"Authorization": f"Bearer {token}", "Accept": FHIR_JSON})


# ---------------------------------------------------------------------------------------------
# The app's redirect_uri: a real local HTTP server that records each callback's query


class CallbackServer:
    def __init__(self):
        self.hits = queue.Queue()
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.put(self.path)
                body = b"<!doctype html><html><body><h1 id='callback'>Callback received</h1></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/callback"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, timeout=20):
        """The query parameters of the next callback request."""
        path = self.hits.get(timeout=timeout)
        assert urllib.parse.urlsplit(path).path == "/callback", path
        return query_of(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# Reading the server's HTML pages (login, consent, portal) without a browser


class Page(html.parser.HTMLParser):
    """Forms (by id, with their inputs and buttons), labels (by `for`) and the visible text."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.forms = []
        self.labels = {}
        self.ids = set()
        self.error_paragraphs = []
        self._form = None
        self._label = None
        self._error = None
        self._skip = 0
        self.text_parts = []
        self.feed(text)
        self.close()
        self.text = " ".join(" ".join(self.text_parts).split())

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "form":
            self._form = {"id": a.get("id"), "action": a.get("action", ""), "method": a.get("method", "get").lower(),
                          "inputs": [], "buttons": []}
            self.forms.append(self._form)
        elif tag in ("input", "select", "textarea") and self._form is not None:
            self._form["inputs"].append(dict(a, tag=tag))
        elif tag == "button" and self._form is not None:
            self._form["buttons"].append(a)
        elif tag == "label" and "for" in a:
            self._label = a["for"]
            self.labels[self._label] = ""
        elif tag == "p" and "error" in a.get("class", "").split():
            self._error = []

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "form":
            self._form = None
        elif tag == "label":
            self._label = None
        elif tag == "p" and self._error is not None:
            self.error_paragraphs.append(" ".join("".join(self._error).split()))
            self._error = None

    def handle_data(self, data):
        if self._skip:
            return
        self.text_parts.append(data)
        if self._label is not None:
            self.labels[self._label] += data
        if self._error is not None:
            self._error.append(data)

    def form(self, form_id):
        found = [f for f in self.forms if f["id"] == form_id]
        assert len(found) == 1, f"expected one <form id={form_id!r}>, found {len(found)}: {self.text[:500]}"
        return found[0]

    @staticmethod
    def inputs(form, name):
        return [i for i in form["inputs"] if i.get("name") == name]

    @staticmethod
    def hidden(form, name):
        found = [i for i in form["inputs"] if i.get("name") == name and i.get("type", "").lower() == "hidden"]
        assert len(found) == 1, f"expected one hidden input {name!r} in form {form['id']!r}: {form['inputs']}"
        return found[0].get("value", "")


def login_and_consent(url, username, password, decision="approve"):
    """Drives the authorize -> login -> consent pages as a plain HTTP user agent (cookies kept).

    Every offered scope is left ticked. Returns (the consent page, the location of the 302
    after consent, the scopes offered in page order)."""
    ua = requests.Session()
    r = ua.get(url, allow_redirects=False)
    assert r.status_code == 200, f"authorize: {r.status_code} {r.headers.get('Location')} {r.text[:500]}"
    assert r.headers.get("Content-Type", "").startswith("text/html"), r.headers
    login = Page(r.text).form("login")
    assert login["method"] == "post" and urllib.parse.urlsplit(login["action"]).path == "/auth/login", login
    assert Page.inputs(login, "username") and Page.inputs(login, "password"), login
    assert any(b.get("id") == "login-submit" and b.get("type", "submit") == "submit" for b in login["buttons"]), login
    r = ua.post(urllib.parse.urljoin(r.url, login["action"]), allow_redirects=False, data={
        "username": username, "password": password, "request": Page.hidden(login, "request")})
    assert r.status_code == 200, f"login: {r.status_code} {r.text[:500]}"
    assert "fl_session" in ua.cookies, ua.cookies
    page = Page(r.text)
    consent = page.form("consent")
    assert consent["method"] == "post" and urllib.parse.urlsplit(consent["action"]).path == "/auth/consent", consent
    boxes = [i for i in Page.inputs(consent, "scope") if i.get("type", "").lower() == "checkbox"]
    for n, box in enumerate(boxes):
        assert box.get("id") == f"scope-{n}" and "checked" in box, f"scope checkbox {n}: {box}"
        assert page.labels.get(f"scope-{n}", "").strip(), f"no <label for=scope-{n}> explains {box.get('value')}"
    decisions = {b.get("id"): (b.get("name"), b.get("value")) for b in consent["buttons"]}
    assert decisions.get("approve") == ("decision", "approve") and decisions.get("deny") == ("decision", "deny"), decisions
    offered = [b["value"] for b in boxes]
    # The form's hidden fields: the pending request and the session's CSRF token.
    data = [("request", Page.hidden(consent, "request")), ("csrf", Page.hidden(consent, "csrf"))]
    data += [("scope", s) for s in offered] + [("decision", decision)]
    r = ua.post(urllib.parse.urljoin(r.url, consent["action"]), data=data, allow_redirects=False)
    assert r.status_code in (302, 303), f"consent: {r.status_code} {r.text[:500]}"
    return page, urllib.parse.urljoin(r.url, r.headers["Location"]), offered


def exchange_code(config, code, redirect_uri, verifier, client_id):
    return requests.post(config["token_endpoint"], data={
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
        "client_id": client_id,
    })


def wait_for_status(fn, want, timeout=10.0):
    """Polls fn() (a requests call) until it answers `want`; returns the last response."""
    deadline = time.monotonic() + timeout
    while True:
        r = fn()
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# A screenshot that shows something: PNG signature, then the pixels decoded with zlib


def png_summary(path):
    """Decodes an 8-bit, non-interlaced PNG (what Chromium writes) with the standard library.

    Returns {"width", "height", "bytes", "colours": distinct pixel values, "dominant": the
    share of the commonest pixel value}."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
        pos += 12 + length
    assert ihdr, "no IHDR"
    width, height, depth, colour_type, _, _, interlace = ihdr
    assert depth == 8 and interlace == 0 and colour_type in (0, 2, 4, 6), ihdr
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    assert len(raw) == height * (stride + 1), "truncated image data"
    prev = bytearray(stride)
    counts = {}
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        else:
            assert ftype == 0, f"bad PNG filter {ftype}"
        row = bytes(line)
        for x in range(0, stride, bpp):
            px = row[x:x + bpp]
            counts[px] = counts.get(px, 0) + 1
        prev = line
    total = width * height
    return {"width": width, "height": height, "bytes": len(data), "colours": len(counts),
            "dominant": max(counts.values()) / total}


def artifacts_dir():
    d = os.environ.get("CONFORMANCE_ARTIFACTS")
    if not d:
        import tempfile
        d = tempfile.mkdtemp(prefix="fhir-ledger-conformance-")
    os.makedirs(d, exist_ok=True)
    return d
