"""A recording reverse proxy: every FHIR resource the conformance clients receive, kept for the
HL7 validator (conformance/hl7-validator).

The clients talk to this proxy instead of the server, so what is recorded is exactly what they
received, whatever language the client is written in. The Host header is passed through, so the
server's absolute URLs (fullUrl, Location, paging links) name the proxy and clients stay on it.

    python3 proxy.py --upstream-file F --out capture.ndjson   # prints "proxy: listening on URL"

The upstream is read from F at the first request, so the proxy can be started (and its URL
given to the server as its public URL) before the server it fronts has chosen a port.
Each line of the output: {"request": "GET /Patient/1", "status": 200, "resource": {...}}.
Identical bodies are recorded once; NDJSON bodies (Bulk files) one line per resource.
"""
import argparse
import hashlib
import http.client
import http.server
import json
import pathlib
import socketserver
import sys
import threading
import urllib.parse

# Hop-by-hop headers (RFC 9110, 7.6.1) are the proxy's own business on each side.
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}


class Recorder:
    def __init__(self, path):
        self.out = open(path, "a", encoding="utf-8")
        self.seen = set()
        self.lock = threading.Lock()

    def record(self, request, status, content_type, body):
        ctype = (content_type or "").split(";")[0].strip().lower()
        if "ndjson" in ctype:
            docs = [line for line in body.splitlines() if line.strip()]
        elif ctype.endswith("json"):
            docs = [body]
        else:
            return
        for doc in docs:
            try:
                resource = json.loads(doc)
            except ValueError:
                continue
            if not isinstance(resource, dict) or "resourceType" not in resource:
                continue  # OAuth and EPCIS answers are JSON but not FHIR
            digest = hashlib.sha256(doc).digest()
            with self.lock:
                if digest in self.seen:
                    continue
                self.seen.add(digest)
                line = json.dumps({"request": request, "status": status, "resource": resource}, separators=(",", ":"))
                self.out.write(line + "\n")
                self.out.flush()


class Upstream:
    def __init__(self, file):
        self.file = pathlib.Path(file)
        self.netloc = None
        self.lock = threading.Lock()

    def get(self):
        with self.lock:
            if self.netloc is None:
                url = self.file.read_text().strip()
                self.netloc = urllib.parse.urlsplit(url).netloc
            return self.netloc


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: with Nagle's algorithm on, the body waits for the
    # client's delayed ACK of the headers (40 ms a response on a kept-alive connection).
    disable_nagle_algorithm = True

    def log_message(self, *args):  # the server logs requests; the proxy stays quiet
        pass

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def relay(self):
        body = self.read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP and k.lower() != "content-length"}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = getattr(self, "_upstream", None)
        for attempt in range(2):
            if conn is None:
                conn = http.client.HTTPConnection(self.server.upstream.get(), timeout=600)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                conn = None
                if attempt == 1:
                    raise
        self._upstream = conn
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.server.recorder.record(f"{self.command} {self.path}", resp.status, resp.getheader("Content-Type"), data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = relay


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--upstream-file", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    host, port = a.listen.rsplit(":", 1)
    server = Server((host, int(port)), Handler)
    server.upstream = Upstream(a.upstream_file)
    server.recorder = Recorder(a.out)
    print(f"proxy: listening on http://{host}:{server.server_address[1]}", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
