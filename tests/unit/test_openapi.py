"""docs/openapi.json against the routes perc-kmf really serves (and docs/API.md beside it).

Both directions are checked against a real in-process KMF over HTTPS (the
set-up of :mod:`tests.unit.test_kmf_oauth_http`, so the ``/oauth/*`` routes
exist too):

* every documented path and method is served: a request to it is answered
  by its handler (not the router's 404 ``no such resource`` or a 405), the
  status is one the document lists for the operation, and operations with
  ``bearer`` security refuse a request without a token with 401;
* every served route is documented: the routing table of the running
  :class:`~perc_daemons.kmf.api.KmfApi` is read, and independently of it the
  route-like string literals of ``api.py`` (found with :mod:`ast`) are probed
  with ``OPTIONS``, whose 405 ``Allow`` header names the methods a path
  serves.
"""

from __future__ import annotations

import ast
import json
import os
import re
import urllib.parse
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent

from perc_daemons.kmf import api as kmf_api
from perc_daemons.kmf.tokens import issue_access_token
from tests.unit import test_kmf_oauth_http as oauth_http
from tests.unit.test_kmf_api import Policy, StreamReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPENAPI = os.path.join(ROOT, "docs", "openapi.json")
API_MD = os.path.join(ROOT, "docs", "API.md")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
PROBLEM = "application/problem+json"
ROUTER_404 = "no such resource"  # the detail of the router's own 404 (no route matched)


def load_spec() -> dict[str, Any]:
    with open(OPENAPI, encoding="utf-8") as f:
        return json.load(f)


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """``node`` with a local ``$ref`` followed (repeatedly); KeyError if it dangles."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise KeyError(f"not a local reference: {ref}")
        target: Any = spec
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
        seen += 1
        if seen > 20:
            raise KeyError(f"reference loop at {ref}")
    return node


def operations(spec: dict[str, Any]):
    """(path, method, operation, path item) for every operation of ``spec``."""
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method], item


def parameters(spec: dict[str, Any], item: dict[str, Any], op: dict[str, Any]) -> list[dict]:
    return [resolve(spec, p) for p in item.get("parameters", []) + op.get("parameters", [])]


def concrete(spec: dict[str, Any], path: str, item: dict[str, Any], op: dict[str, Any]) -> str:
    """``path`` with its template variables replaced by the parameters' examples."""
    examples = {p["name"]: p.get("example", "x") for p in parameters(spec, item, op)
                if p["in"] == "path"}
    return re.sub(r"\{([^}]+)\}",
                  lambda m: urllib.parse.quote(str(examples.get(m.group(1), "x")), safe="@"),
                  path)


def template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def documented_template(spec: dict[str, Any], path: str) -> str | None:
    """The documented path template that ``path`` (concrete) is an instance of."""
    if path in spec["paths"]:
        return path
    for template in spec["paths"]:
        if template_regex(template).fullmatch(path):
            return template
    return None


def route_template(pattern: str) -> str:
    """A routing regex of api.py (``/v1/conferences/(?P<cid>[^/]+)``) as a path template."""
    text = re.sub(r"\(\?P<([A-Za-z_]\w*)>[^)]*\)", r"{\1}", pattern)
    return re.sub(r"\\(.)", r"\1", text)


def walk_refs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from walk_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_refs(value)


class OpenApiDocumentTests(unittest.TestCase):
    """The document's own sanity (no server)."""

    def setUp(self):
        self.spec = load_spec()

    def test_version_and_info(self):
        self.assertRegex(self.spec.get("openapi", ""), r"^3\.1\.\d+$")
        self.assertTrue(self.spec["info"]["title"])
        self.assertTrue(self.spec["info"]["version"])
        self.assertTrue(self.spec["paths"])

    def test_every_ref_resolves(self):
        refs = list(walk_refs(self.spec))
        self.assertTrue(refs)
        for ref in refs:
            try:
                resolve(self.spec, {"$ref": ref})
            except (KeyError, TypeError) as e:
                self.fail(f"unresolved $ref {ref}: {e}")

    def test_every_operation_has_responses_and_a_unique_id(self):
        ids = []
        for path, method, op, item in operations(self.spec):
            where = f"{method.upper()} {path}"
            self.assertTrue(op.get("responses"), f"{where}: no responses")
            for status, response in op["responses"].items():
                self.assertRegex(status, r"^([1-5]\d\d|[1-5]XX|default)$", where)
                self.assertTrue(resolve(self.spec, response).get("description"),
                                f"{where} {status}: no description")
            self.assertTrue(any(s.startswith("2") or s.startswith("3") for s in op["responses"]),
                            f"{where}: no success response")
            self.assertIn("security", op, f"{where}: security not stated")
            for requirement in op["security"]:
                for scheme in requirement:
                    self.assertIn(scheme, self.spec["components"]["securitySchemes"], where)
            ids.append(op.get("operationId"))
            # every template variable is a declared path parameter and vice versa
            declared = {p["name"] for p in parameters(self.spec, item, op) if p["in"] == "path"}
            self.assertEqual(set(re.findall(r"\{([^}]+)\}", path)), declared, where)
        self.assertNotIn(None, ids)
        self.assertEqual(len(ids), len(set(ids)), "duplicate operationId")

    def test_scopes_are_the_api_scopes(self):
        used = {scope for _, _, op, _ in operations(self.spec)
                for requirement in op["security"] for scope in requirement.get("bearer", [])}
        self.assertEqual(used, set(kmf_api.API_SCOPES))

    def test_errors_are_problem_details(self):
        problem = self.spec["components"]["schemas"]["Problem"]
        self.assertEqual(set(problem["required"]), {"type", "title", "status"})
        checked = 0
        for path, method, op, _ in operations(self.spec):
            if path.startswith("/oauth/"):
                continue  # OAuth's own formats (RFC 6749 s5.2, HTML pages), except 413
            for status, response in op["responses"].items():
                if status[0] not in "45":
                    continue
                content = resolve(self.spec, response).get("content", {})
                where = f"{method.upper()} {path} {status}"
                self.assertIn(PROBLEM, content, where)
                self.assertIs(resolve(self.spec, content[PROBLEM]["schema"]), problem, where)
                checked += 1
        self.assertGreater(checked, 0)

    def test_api_md_covers_every_route(self):
        with open(API_MD, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("openapi.json", text)
        for needle in ("Encryption-Key", "text/event-stream", "problem+json", "cnf"):
            self.assertIn(needle, text)
        for scope in kmf_api.API_SCOPES:
            self.assertIn(f"`{scope}`", text)
        for path, method, _, _ in operations(self.spec):
            self.assertRegex(text, rf"{method.upper()}\s+`?{re.escape(path)}`?",
                             f"{method.upper()} {path} not in API.md")


class OpenApiServedTests(unittest.TestCase):
    """The document against a running KMF."""

    timeout = 20

    def setUp(self):
        self.spec = load_spec()
        # the OAuth HTTPS tests' set-up: KmfApi with an AuthorizationServer over real TLS
        return oauth_http.OAuthHttpTests.setUp(self)

    @defer.inlineCallbacks
    def request(self, method: str, path: str, *, token: str | None = None,
                body: bytes | None = None, content_type: str | None = None):
        agent = Agent(reactor, contextFactory=Policy(self.server_cert, self.alice_cert),
                      pool=self.pool)
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = yield treq.request(method, self.base + path, headers=headers, data=body,
                                      agent=agent, allow_redirects=False)
        media = (response.headers.getRawHeaders("content-type") or [""])[0]
        if media.startswith("text/event-stream"):
            reader = StreamReader()  # a stream that stays open: take what is there, hang up
            response.deliverBody(reader)
            reader.transport.stopProducing()
            yield reader.done
            return response, reader.data
        content = yield treq.content(response)
        return response, content

    def assertHandled(self, where: str, response, content: bytes):
        """The request reached a route's handler: not the router's 404, not 405."""
        self.assertNotEqual(response.code, 405, f"{where}: method not served ({content!r})")
        if response.code == 404:
            detail = json.loads(content).get("detail") if content.startswith(b"{") else None
            self.assertNotEqual(detail, ROUTER_404, f"{where}: path not served")

    def assertDocumentedStatus(self, where: str, op: dict[str, Any], status: int):
        documented = set(op["responses"])
        self.assertTrue({str(status), f"{str(status)[0]}XX", "default"} & documented,
                        f"{where}: answered {status}, documented {sorted(documented)}")

    @defer.inlineCallbacks
    def test_documented_operations_are_served_without_credentials(self):
        count = 0
        for path, method, op, item in operations(self.spec):
            where = f"{method.upper()} {path}"
            response, content = yield self.request(method.upper(),
                                                   concrete(self.spec, path, item, op))
            self.assertHandled(where, response, content)
            self.assertDocumentedStatus(where, op, response.code)
            if any("bearer" in requirement for requirement in op["security"]):
                self.assertEqual(response.code, 401, f"{where}: served without a token")
                self.assertEqual(response.headers.getRawHeaders("content-type"), [PROBLEM])
                self.assertTrue(response.headers.getRawHeaders("www-authenticate")[0]
                                .startswith("Bearer"), where)
            else:
                self.assertNotEqual(response.code, 401, f"{where}: documented as public")
            count += 1
        self.assertGreaterEqual(count, 20)

    @defer.inlineCallbacks
    def test_documented_operations_with_a_token_and_example_bodies(self):
        token = issue_access_token(
            self.keys, issuer=oauth_http.ISSUER, subject="alice@example.com",
            audience=oauth_http.ISSUER, client_id="client-1",
            scopes=list(kmf_api.API_SCOPES), now=reactor.seconds(), lifetime=300,
            certificate_thumbprint=self.alice_cert.digest)
        count = 0
        for path, method, op, item in operations(self.spec):
            if not any("bearer" in requirement for requirement in op["security"]):
                continue
            where = f"{method.upper()} {path}"
            body = content_type = None
            if "requestBody" in op:
                [(content_type, media)] = resolve(self.spec, op["requestBody"])["content"].items()
                self.assertEqual(content_type, "application/json", where)
                body = json.dumps(media["example"]).encode()
            response, content = yield self.request(
                method.upper(), concrete(self.spec, path, item, op), token=token, body=body,
                content_type=content_type)
            self.assertHandled(where, response, content)
            self.assertNotIn(response.code, (401, 403), f"{where}: {content!r}")
            self.assertDocumentedStatus(where, op, response.code)
            media_type = (response.headers.getRawHeaders("content-type") or [""])[0]
            if response.code >= 400:
                self.assertEqual(media_type, PROBLEM, where)
            elif content:
                self.assertIn(media_type.split(";")[0],
                              resolve(self.spec, op["responses"][str(response.code)])["content"],
                              where)
            count += 1
        self.assertGreaterEqual(count, 12)

    def test_route_table_is_documented(self):
        """Every (pattern, method) of the running KmfApi's routing table is in the document."""
        routes = self.api._routes
        self.assertGreaterEqual(len(routes), 15)
        served = set()
        for pattern, methods in routes:
            template = route_template(pattern.pattern)
            for method in methods:
                served.add((template, method.decode("ascii").lower()))
        documented = {(path, method) for path, method, _, _ in operations(self.spec)}
        self.assertEqual(sorted(served - documented), [], "served but not documented")
        self.assertEqual(sorted(documented - served), [], "documented but not served")

    def candidate_paths(self) -> set[str]:
        """Concrete paths built from the route-like string literals of api.py."""
        with open(kmf_api.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        literals = {re.sub(r"\\(.)", r"\1", node.value) for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"/[\w.\\\-/()?P<>\[\]^+]*", node.value)}
        examples = {name: "x" for name in ("cid", "identity")}
        for component in self.spec["components"].get("parameters", {}).values():
            if component.get("in") == "path" and "example" in component:
                examples[component["name"]] = component["example"]
        roots = {t for t in literals if t.startswith(("/v1", "/.well-known", "/oauth"))}
        suffixes = literals - roots
        templates = set(roots)
        for root in roots:
            if "(?P<" in root:  # a parent of sub-resources
                templates |= {root + suffix for suffix in suffixes}

        def fill(match: re.Match[str]) -> str:
            return urllib.parse.quote(str(examples.get(match.group(1), "x")), safe="@")

        return {re.sub(r"\(\?P<(\w+)>[^)]*\)", fill, t) for t in templates}

    @defer.inlineCallbacks
    def test_probed_routes_are_documented(self):
        """Independently of the routing table: OPTIONS every route-like path of api.py.

        A path no route matches answers 404 (router); one that matches answers
        405 with ``Allow`` (no route serves OPTIONS) -- or, should one ever do,
        the other methods are tried one by one.
        """
        candidates = self.candidate_paths()
        self.assertGreaterEqual(len(candidates), 15, candidates)
        found = set()
        for path in sorted(candidates):
            response, _ = yield self.request("OPTIONS", path)
            if response.code == 404:
                continue
            if response.code == 405:
                allowed = [m.strip() for m in response.headers.getRawHeaders("allow")[0].split(",")]
            else:
                allowed = ["OPTIONS"]
                for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
                    probe, _ = yield self.request(method, path)
                    if probe.code not in (404, 405):
                        allowed.append(method)
            # the router ignores one trailing slash, and so does the document
            template = documented_template(self.spec, path.rstrip("/") or "/")
            self.assertIsNotNone(template, f"{path} is served ({allowed}) but not documented")
            for method in allowed:
                self.assertIn(method.lower(), self.spec["paths"][template],
                              f"{method} {path} is served but not documented")
            found.add(template)
        # the probe reached every route (else it proves nothing about the ones it missed)
        self.assertEqual(len(found), len(self.api._routes), sorted(found))
