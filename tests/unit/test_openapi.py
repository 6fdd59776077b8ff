"""docs/openapi.json against the routes perc-kmf and perc-md really serve (and docs/API.md).

The document describes the KMF (its top-level ``servers``) and, on paths with
a path-level ``servers`` override naming the MD (:data:`MD_SERVER`, tag
``perc-md``), the perc-md routes whose paths are not the KMF's.  The MD's
conference create/show/delete routes share the KMF's paths and are left to
docs/API.md (:data:`MD_ROUTES_NOT_DOCUMENTED`).

Both directions are checked against a real in-process KMF over HTTPS (the
set-up of :mod:`tests.unit.test_kmf_oauth_http`, so the ``/oauth/*`` routes
exist too), for the KMF's paths:

* every documented path and method is served: a request to it is answered
  by its handler (not the router's 404 ``no such resource`` or a 405), the
  status is one the document lists for the operation, and operations with
  ``bearer`` security refuse a request without a token with 401;
* every served route is documented: the routing table of the running
  :class:`~perc_daemons.kmf.api.KmfApi` is read, and independently of it the
  route-like string literals of ``api.py`` (found with :mod:`ast`) are probed
  with ``OPTIONS``, whose 405 ``Allow`` header names the methods a path
  serves.

and against a real in-process perc-md over HTTPS with a provider token (the
set-up of :mod:`tests.unit.test_md_api`, with a KD tunnel played by the
test), for the MD's paths, the same way; the MD's answers are also checked
against the documented schemas (:func:`schema_errors`, a checker of the
JSON Schema keywords the MD's part of the document uses), including a
cascade link made between two MDs by the document's three requests and a
307 placement between two processes of one host.
"""

from __future__ import annotations

import ast
import json
import os
import re
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import Any

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent

from perc_daemons import config
from perc_daemons.kmf import api as kmf_api
from perc_daemons.kmf.tokens import issue_access_token
from perc_daemons.md import api as md_api
from perc_daemons.md.plane import LEG_DROP_REASONS, LINK_COUNTERS
from perc_daemons.md.service import md_service
from tests.unit import test_kmf_oauth_http as oauth_http
from tests.unit import test_md_api as md_api_tests
from tests.unit import test_md_cluster as md_cluster_tests
from tests.unit.test_kmf_api import Policy, StreamReader
from tests.unit.test_md_api import PROVIDER_TOKEN, TrustCa

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPENAPI = os.path.join(ROOT, "docs", "openapi.json")
API_MD = os.path.join(ROOT, "docs", "API.md")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
PROBLEM = "application/problem+json"
ROUTER_404 = "no such resource"  # the detail of the router's own 404 (no route matched)
#: The path-level ``servers`` of the perc-md paths.
MD_SERVER = "https://md.example.net:9443"
#: The security schemes of the MD's operations (besides none, for a join).
MD_SCHEMES = {"providerToken", "leaveToken"}
#: perc-md routes the document leaves to docs/API.md: their paths are the KMF's
#: (``/v1/conferences``, ``/v1/conferences/{cid}``), and an OpenAPI document has one
#: path item per path, so they cannot be described for a second server.
MD_ROUTES_NOT_DOCUMENTED = {("/v1/conferences", "post"), ("/v1/conferences/{cid}", "get"),
                            ("/v1/conferences/{cid}", "delete")}


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


def served_by_md(item: dict[str, Any]) -> bool:
    """Whether a path item's path-level ``servers`` point at the MD (not the KMF)."""
    return any(server.get("url") == MD_SERVER for server in item.get("servers", []))


def kmf_operations(spec: dict[str, Any]):
    return ((path, method, op, item) for path, method, op, item in operations(spec)
            if not served_by_md(item))


def md_operations(spec: dict[str, Any]):
    return ((path, method, op, item) for path, method, op, item in operations(spec)
            if served_by_md(item))


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


def documented_template(templates: Iterable[str], path: str) -> str | None:
    """The path template of ``templates`` that ``path`` (concrete) is an instance of."""
    templates = list(templates)
    if path in templates:
        return path
    for template in templates:
        if template_regex(template).fullmatch(path):
            return template
    return None


def route_template(pattern: str) -> str:
    """A routing regex of api.py (``/v1/conferences/(?P<cid>[^/]+)``) as a path template."""
    text = re.sub(r"\(\?P<([A-Za-z_]\w*)>[^)]*\)", r"{\1}", pattern)
    return re.sub(r"\\(.)", r"\1", text)


def route_literals(filename: str) -> set[str]:
    """The route-like string literals of a module: constants, and f-strings with each
    replacement field as a named group (``f"/v1/conferences/{cid}"`` ->
    ``/v1/conferences/(?P<cid>[^/]+)``), their escapes removed."""
    with open(filename, encoding="utf-8") as f:
        tree = ast.parse(f.read())

    def field(node: ast.expr) -> str:
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "x")
        return f"(?P<{name}>[^/]+)"

    texts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.add(node.value)
        elif isinstance(node, ast.JoinedStr):
            texts.add("".join(part.value if isinstance(part, ast.Constant) else
                              field(part.value) for part in node.values
                              if isinstance(part, ast.Constant | ast.FormattedValue)))
    return {re.sub(r"\\(.)", r"\1", text) for text in texts
            if re.fullmatch(r"/[\w.\\\-/()?P<>\[\]^+]*", text)}


def candidate_paths(spec: dict[str, Any], filename: str, roots: tuple[str, ...]) -> set[str]:
    """Concrete paths built from the route-like string literals of ``filename``: those
    starting with one of ``roots``, and each of them with a named group (a parent of
    sub-resources) followed by each other literal; groups filled with the examples of the
    document's path parameters ("x" for others)."""
    literals = route_literals(filename)
    examples = {}
    for component in spec["components"].get("parameters", {}).values():
        if component.get("in") == "path" and "example" in component:
            examples[component["name"]] = component["example"]
    starts = {t for t in literals if t.startswith(roots)}
    suffixes = literals - starts
    templates = set(starts)
    for start in starts:
        if "(?P<" in start:
            templates |= {start + suffix for suffix in suffixes}

    def fill(match: re.Match[str]) -> str:
        return urllib.parse.quote(str(examples.get(match.group(1), "x")), safe="@")

    return {re.sub(r"\(\?P<(\w+)>[^)]*\)", fill, t) for t in templates}


SCHEMA_KEYWORDS = {"$ref", "type", "const", "enum", "required", "properties",
                   "additionalProperties", "items", "pattern", "minLength", "maxLength",
                   "minimum", "maximum", "format", "oneOf", "if", "then"}
SCHEMA_ANNOTATIONS = {"description", "examples", "default"}
JSON_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool,
                              "null": type(None)}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, JSON_TYPES[name])


def schema_errors(spec: dict[str, Any], schema: dict[str, Any], value: Any,
                  where: str = "$") -> list[str]:
    """How ``value`` fails ``schema`` (JSON Schema 2020-12, the keywords in
    :data:`SCHEMA_KEYWORDS`); a schema using any other keyword fails the test, so
    nothing the document says goes unchecked."""
    unknown = set(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
    if unknown:
        raise AssertionError(f"{where}: schema keyword(s) not checked here: {sorted(unknown)}")
    errors: list[str] = []
    if "$ref" in schema:
        errors += schema_errors(spec, resolve(spec, {"$ref": schema["$ref"]}), value, where)
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_is_type(value, name) for name in types):
            return [*errors, f"{where}: {value!r} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or \
                len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{where}: length {len(value)} outside the documented bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "uuid":
            try:
                canonical = str(uuid.UUID(value)) == value
            except ValueError:
                canonical = False
            if not canonical:
                errors.append(f"{where}: {value!r} is not a canonical UUID")
        elif schema.get("format") == "uri":
            parts = urllib.parse.urlsplit(value)
            if not (parts.scheme and parts.netloc):
                errors.append(f"{where}: {value!r} is not an absolute URI")
        elif "format" in schema:
            raise AssertionError(f"{where}: format {schema['format']!r} not checked here")
    if _is_type(value, "number"):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            errors.append(f"{where}: {value} outside the documented bounds")
    if isinstance(value, dict):
        errors += [f"{where}: {name!r} missing" for name in schema.get("required", [])
                   if name not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, member in value.items():
            if name in properties:
                errors += schema_errors(spec, properties[name], member, f"{where}.{name}")
            elif extra is False:
                errors.append(f"{where}: {name!r} is not documented")
            elif isinstance(extra, dict):
                errors += schema_errors(spec, extra, member, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, member in enumerate(value):
            errors += schema_errors(spec, schema["items"], member, f"{where}[{index}]")
    if "oneOf" in schema:
        passing = [s for s in schema["oneOf"] if not schema_errors(spec, s, value, where)]
        if len(passing) != 1:
            errors.append(f"{where}: {value!r} matches {len(passing)} of oneOf, not 1")
    if "if" in schema and not schema_errors(spec, schema["if"], value, where):
        errors += schema_errors(spec, schema.get("then", {}), value, where)
    return errors


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
    """The document against a running KMF.

    Only the KMF's paths: those whose path-level ``servers`` point at the MD are
    served by perc-md, not by the KMF (a KMF answers them with its router's 404),
    and are checked against a running MD by :class:`OpenApiMdServedTests`.
    """

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
        for path, method, op, item in kmf_operations(self.spec):
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
        for path, method, op, item in kmf_operations(self.spec):
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
        documented = {(path, method) for path, method, _, _ in kmf_operations(self.spec)}
        self.assertEqual(sorted(served - documented), [], "served but not documented")
        self.assertEqual(sorted(documented - served), [], "documented but not served")

    @defer.inlineCallbacks
    def test_probed_routes_are_documented(self):
        """Independently of the routing table: OPTIONS every route-like path of api.py.

        A path no route matches answers 404 (router); one that matches answers
        405 with ``Allow`` (no route serves OPTIONS) -- or, should one ever do,
        the other methods are tried one by one.
        """
        candidates = candidate_paths(self.spec, kmf_api.__file__,
                                     ("/v1", "/.well-known", "/oauth"))
        self.assertGreaterEqual(len(candidates), 15, candidates)
        kmf_paths = {path for path, item in self.spec["paths"].items()
                     if not served_by_md(item)}
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
            template = documented_template(kmf_paths, path.rstrip("/") or "/")
            self.assertIsNotNone(template, f"{path} is served ({allowed}) but not documented")
            for method in allowed:
                self.assertIn(method.lower(), self.spec["paths"][template],
                              f"{method} {path} is served but not documented")
            found.add(template)
        # the probe reached every route (else it proves nothing about the ones it missed)
        self.assertEqual(len(found), len(self.api._routes), sorted(found))


class OpenApiMdDocumentTests(unittest.TestCase):
    """The perc-md part of the document (no server)."""

    def setUp(self):
        self.spec = load_spec()

    def test_md_paths_are_marked_as_the_mds(self):
        md_paths = [path for path, item in self.spec["paths"].items() if served_by_md(item)]
        self.assertEqual(sorted(md_paths), sorted([
            "/v1/md", "/v1/conferences/{cid}/links", "/v1/conferences/{cid}/links/{link}",
            "/v1/conferences/{cid}/participants",
            "/v1/conferences/{cid}/participants/{association}"]))
        self.assertNotIn(MD_SERVER, [s["url"] for s in self.spec["servers"]])
        schemes = self.spec["components"]["securitySchemes"]
        for name in MD_SCHEMES:
            self.assertEqual((schemes[name]["type"], schemes[name]["scheme"]),
                             ("http", "bearer"), name)
            self.assertNotIn("bearerFormat", schemes[name], name)  # not a JWT
        self.assertIn("not an OAuth access token", schemes["providerToken"]["description"])
        for path, method, op, item in operations(self.spec):
            where = f"{method.upper()} {path}"
            # the only path-level servers are the MD's
            self.assertEqual([s["url"] for s in item.get("servers", [{"url": MD_SERVER}])],
                             [MD_SERVER], where)
            used = {scheme for requirement in op["security"] for scheme in requirement}
            if served_by_md(item):
                self.assertEqual(op["tags"], ["perc-md"], where)
                self.assertLessEqual(used, MD_SCHEMES, where)
                self.assertLessEqual(len(op["security"]), 1, where)  # no alternatives
            else:
                self.assertNotIn("perc-md", op["tags"], where)
                self.assertFalse(used & MD_SCHEMES, where)
        self.assertIn("perc-md", [tag["name"] for tag in self.spec["tags"]])

    def test_colliding_md_routes_are_named_in_the_description(self):
        description = self.spec["info"]["description"]
        for path, method in MD_ROUTES_NOT_DOCUMENTED:
            # they collide: the KMF's path item is there, and it is not the MD's
            self.assertFalse(served_by_md(self.spec["paths"][path]), path)
            self.assertIn(f"`{method.upper()} {path}`", description)
        self.assertIn("docs/API.md", description)

    def test_link_counters_are_the_media_planes(self):
        schemas = self.spec["components"]["schemas"]
        link = schemas["Link"]
        counters = {name for name, schema in link["properties"].items()
                    if schema == {"type": "integer", "minimum": 0}}
        self.assertEqual(counters, set(LINK_COUNTERS))
        self.assertLessEqual(set(LINK_COUNTERS) | {"drops"}, set(link["required"]))
        drops = schemas["LinkDrops"]
        self.assertEqual(set(drops["properties"]), set(LEG_DROP_REASONS))
        self.assertEqual(set(drops["required"]), set(LEG_DROP_REASONS))

    def test_md_examples_match_their_schemas(self):
        """Every example of the MD's operations (bodies, answers, schema examples)."""
        checked = 0
        for path, method, op, _ in md_operations(self.spec):
            where = f"{method.upper()} {path}"
            media = []
            if "requestBody" in op:
                media += list(resolve(self.spec, op["requestBody"])["content"].values())
            for response in op["responses"].values():
                media += list(resolve(self.spec, response).get("content", {}).values())
            for one in media:
                schema = resolve(self.spec, one["schema"])
                examples = ([one["example"]] if "example" in one else []) + \
                    schema.get("examples", [])
                for example in examples:
                    self.assertEqual(schema_errors(self.spec, one["schema"], example), [],
                                     where)
                    checked += 1
        self.assertGreaterEqual(checked, 10)

    def test_schema_check_can_fail(self):
        """:func:`schema_errors` finds what is wrong (else the tests below prove nothing)."""
        link = {"$ref": "#/components/schemas/Link"}
        example = resolve(self.spec, self.spec["paths"]["/v1/conferences/{cid}/links"]["post"]
                          ["responses"]["201"])["content"]["application/json"]["example"]
        self.assertEqual(schema_errors(self.spec, link, example), [])
        for change in ({"state": "sleeping"}, {"peer": {"host": "192.0.2.1"}},
                       {"rtp_in": -1}, {"id": "not-a-uuid"}, {"fingerprint": "AA:BB"},
                       {"unknown": 1}, {"drops": {**example["drops"], "new_reason": 0}},
                       {"peer": 5}):
            self.assertTrue(schema_errors(self.spec, link, {**example, **change}), change)
        self.assertTrue(schema_errors(self.spec, link, {k: v for k, v in example.items()
                                                        if k != "rtcp_out_bytes"}))
        create = {"$ref": "#/components/schemas/LinkCreate"}
        self.assertTrue(schema_errors(self.spec, create, {"role": "client",
                                                          "peer_fingerprint": example[
                                                              "fingerprint"]}))
        with self.assertRaises(AssertionError):
            schema_errors(self.spec, {"type": "string", "contentEncoding": "base64"}, "x")


class MdChecks:
    """Requests to a running perc-md and checks of its answers against the document."""

    spec: dict[str, Any]
    md_agent: Any

    @defer.inlineCallbacks
    def md_request(self, method: str, url: str, *, token: str | None = None,
                   body: Any = None):
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = yield treq.request(method, url, headers=headers, data=data,
                                      agent=self.md_agent, allow_redirects=False)
        content = yield treq.content(response)
        return response, content

    def assertHandled(self, where: str, response, content: bytes):
        """The request reached a route's handler: not the router's 404, not 405."""
        self.assertNotEqual(response.code, 405, f"{where}: method not served ({content!r})")
        if response.code == 404:
            detail = json.loads(content).get("detail")
            self.assertNotEqual(detail, ROUTER_404, f"{where}: path not served")

    def assertAnswerDocumented(self, where: str, op: dict[str, Any], response,
                               content: bytes) -> Any:
        """The status is the operation's, the body its media type and schema, every header
        the response documents is there; returns the parsed body (None without one)."""
        status = str(response.code)
        self.assertIn(status, op["responses"], f"{where}: answered {status}, documented "
                                               f"{sorted(op['responses'])} ({content!r})")
        documented = resolve(self.spec, op["responses"][status])
        media_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        for name in documented.get("headers", {}):
            self.assertTrue(response.headers.hasHeader(name), f"{where} {status}: no {name}")
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"], where)
        if "content" not in documented:
            self.assertEqual(content, b"", f"{where} {status}")
            return None
        self.assertIn(media_type, documented["content"], f"{where} {status}")
        body = json.loads(content)
        self.assertEqual(schema_errors(self.spec, documented["content"][media_type]["schema"],
                                       body), [], f"{where} {status}: {body!r}")
        return body

    def md_operation(self, path: str, method: str) -> dict[str, Any]:
        item = self.spec["paths"][path]
        self.assertTrue(served_by_md(item), path)
        return item[method]


class OpenApiMdServedTests(MdChecks, unittest.TestCase):
    """The document's perc-md paths against a running perc-md.

    The MD is the daemon's own service (``md_service``) over real HTTPS with a
    provider token file, set up as :mod:`tests.unit.test_md_api` does; the KD
    is a real tunnel client whose handler signs the answers (``PlayKd``).
    """

    timeout = 30
    # the set-up of test_md_api (md_service on loopback, dev PKI, provider token file),
    # borrowed by function: importing its TestCase class here would run its tests here
    write_token = md_api_tests.MdServiceTests.write_token
    eventually = md_api_tests.MdServiceTests.eventually
    connect_kd = md_api_tests.MdServiceTests.connect_kd

    def setUp(self):
        self.spec = load_spec()
        md_api_tests.MdServiceTests.setUp(self)
        with open(self.ca_path, "rb") as f:
            self.md_agent = Agent(reactor, contextFactory=TrustCa(f.read()), pool=self.pool)
        # the conference the document's examples name
        self.cid = self.spec["components"]["parameters"]["ConferenceId"]["example"]
        self.conferences.create(self.cid, bytes.fromhex(self.kd_fp.replace(":", "")))

    def credentials(self, op: dict[str, Any]) -> str | None:
        """The token an operation's security asks for: the provider's, or a leave token
        (of no present participant: a leave is idempotent)."""
        [schemes] = [set(requirement) for requirement in op["security"]] or [set()]
        if "providerToken" in schemes:
            return PROVIDER_TOKEN
        if "leaveToken" in schemes:
            return "a-leave-token-of-nobody-here"
        return None

    @defer.inlineCallbacks
    def test_md_documented_operations_are_served_without_credentials(self):
        count = 0
        for path, method, op, item in md_operations(self.spec):
            where = f"{method.upper()} {path}"
            response, content = yield self.md_request(
                method.upper(), self.base + concrete(self.spec, path, item, op))
            self.assertHandled(where, response, content)
            self.assertAnswerDocumented(where, op, response, content)
            if op["security"]:
                self.assertEqual(response.code, 401, f"{where}: served without a token")
                self.assertEqual(response.headers.getRawHeaders("content-type"), [PROBLEM])
                self.assertTrue(response.headers.getRawHeaders("www-authenticate")[0]
                                .startswith('Bearer realm="perc-md"'), where)
            else:
                self.assertNotEqual(response.code, 401, f"{where}: documented as public")
            count += 1
        self.assertEqual(count, 8)

    @defer.inlineCallbacks
    def test_md_documented_operations_with_credentials_and_example_bodies(self):
        yield self.connect_kd()
        statuses = {}
        for path, method, op, item in md_operations(self.spec):
            where = f"{method.upper()} {path}"
            body = None
            if "requestBody" in op:
                [(content_type, media)] = resolve(self.spec, op["requestBody"])["content"].items()
                self.assertEqual(content_type, "application/json", where)
                body = media["example"]
            response, content = yield self.md_request(
                method.upper(), self.base + concrete(self.spec, path, item, op),
                token=self.credentials(op), body=body)
            self.assertHandled(where, response, content)
            self.assertNotIn(response.code, (401, 403), f"{where}: {content!r}")
            self.assertAnswerDocumented(where, op, response, content)
            statuses[where] = response.code
        # the examples work: a link accepted, a participant joined (the KD signed its
        # answer); the example link is not this MD's (404), the example participant gone
        # (a receive change for it is 404, its leave 204: idempotent)
        self.assertEqual(statuses, {
            "PATCH /v1/conferences/{cid}/participants/{association}": 404,
            "GET /v1/md": 200, "GET /v1/conferences/{cid}/links": 200,
            "POST /v1/conferences/{cid}/links": 201,
            "PATCH /v1/conferences/{cid}/links/{link}": 404,
            "DELETE /v1/conferences/{cid}/links/{link}": 404,
            "POST /v1/conferences/{cid}/participants": 201,
            "DELETE /v1/conferences/{cid}/participants/{association}": 204})

    def start_peer_md(self):
        """A second perc-md (its own certificate, same provider token), the conference
        created there too."""
        leaf = self.pki.issue("md-b", ["localhost"], ["127.0.0.1"])
        cfg = config.validate("md", os.path.join(self.dir, "md-b.toml"), {
            "admin": {"bind": "127.0.0.1", "port": 0},
            "api": {"bind": "127.0.0.1", "port": 0, "certificate": str(leaf.certificate),
                    "private_key": str(leaf.private_key),
                    "provider_token_file": self.token_path},
            "media": {"bind": "127.0.0.1", "port": 0},
            "tunnel": {"bind": "127.0.0.1", "port": 0},
            "state": {"file": os.path.join(self.dir, "md-b-state.json")},
        })
        peer = md_service(cfg, reactor)
        peer.startService()
        self.addCleanup(peer.stopService)
        peer.conferences.create(self.cid, bytes.fromhex(self.kd_fp.replace(":", "")))
        return f"https://127.0.0.1:{peer.getServiceNamed('md-api').port.getHost().port}"

    @defer.inlineCallbacks
    def call(self, base: str, method: str, path: str, body: Any = None, *,
             want: int, token: str | None = PROVIDER_TOKEN):
        """One documented request, its answer checked against the document."""
        template = documented_template(
            [p for p, item in self.spec["paths"].items() if served_by_md(item)], path)
        self.assertIsNotNone(template, path)
        op = self.md_operation(template, method.lower())
        response, content = yield self.md_request(method, base + path, token=token,
                                                  body=body)
        where = f"{method} {path}"
        self.assertEqual(response.code, want, f"{where}: {content!r}")
        return response, self.assertAnswerDocumented(where, op, response, content)

    @defer.inlineCallbacks
    def test_md_cascade_link_made_as_the_document_says(self):
        """The three requests of createCascadeLink between two real MDs; the link comes
        up; every answer is the documented one."""
        a, b = self.base, self.start_peer_md()
        _, info_a = yield self.call(a, "GET", "/v1/md", want=200)
        _, info_b = yield self.call(b, "GET", "/v1/md", want=200)
        self.assertEqual(info_a["load"], {"participants": 0, "conferences": 1})
        self.assertEqual(info_a["cluster"], [])
        links = f"/v1/conferences/{self.cid}/links"
        # 1. on the accepting MD (B)
        response, accepted = yield self.call(
            b, "POST", links, {"role": "server", "peer_fingerprint": info_a["fingerprint"]},
            want=201)
        self.assertEqual(response.headers.getRawHeaders("location"),
                         [f"{links}/{accepted['id']}"])
        self.assertEqual((accepted["state"], accepted["peer"], accepted["fingerprint"],
                          accepted["media"]),
                         ("awaiting_peer", None, info_b["fingerprint"], info_b["media"]))
        # 2. on the opening MD (A), with what B answered
        _, opened = yield self.call(a, "POST", links, {
            "role": "client", "peer": accepted["media"],
            "peer_fingerprint": accepted["fingerprint"],
            "peer_ice_ufrag": accepted["ice_ufrag"], "peer_ice_pwd": accepted["ice_pwd"]},
            want=201)
        self.assertEqual((opened["role"], opened["peer"]), ("client", info_b["media"]))
        # 3. back on B, with A's credentials
        _, completed = yield self.call(b, "PATCH", f"{links}/{accepted['id']}", {
            "peer_ice_ufrag": opened["ice_ufrag"], "peer_ice_pwd": opened["ice_pwd"]},
            want=200)
        self.assertNotEqual(completed["state"], "awaiting_peer")
        yield self.call(b, "PATCH", f"{links}/{accepted['id']}", {
            "peer_ice_ufrag": opened["ice_ufrag"], "peer_ice_pwd": opened["ice_pwd"]},
            want=409)
        for _ in range(200):
            states = []
            for base in (a, b):
                _, listed = yield self.call(base, "GET", links, want=200)
                states += [link["state"] for link in listed["links"]]
            if states == ["up", "up"]:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(states, ["up", "up"])
        self.assertGreater(listed["links"][0]["dtls_in"], 0)
        # the refusals the operation documents
        yield self.call(a, "POST", links, {"role": "server", "peer_fingerprint": "AB:CD"},
                        want=400)
        yield self.call(a, "POST", links, {"role": "client", "peer": accepted["media"],
                                           "peer_fingerprint": accepted["fingerprint"],
                                           "peer_ice_ufrag": accepted["ice_ufrag"],
                                           "peer_ice_pwd": accepted["ice_pwd"]}, want=409)
        yield self.call(a, "POST", "/v1/conferences/nope/links",
                        {"role": "server", "peer_fingerprint": info_b["fingerprint"]},
                        want=404)
        yield self.call(a, "POST", links, b"[]", want=400)
        yield self.call(a, "GET", links, want=403, token="wrong")
        # DELETE: A's half goes
        yield self.call(a, "DELETE", f"{links}/{opened['id']}", want=204)
        _, listed = yield self.call(a, "GET", links, want=200)
        self.assertEqual(listed, {"links": []})
        yield self.call(a, "DELETE", f"{links}/{opened['id']}", want=404)

    @defer.inlineCallbacks
    def test_md_join_and_leave_as_the_document_says(self):
        yield self.connect_kd()
        participants = f"/v1/conferences/{self.cid}/participants"
        join = self.md_operation("/v1/conferences/{cid}/participants", "post")
        offer = join["requestBody"]["content"]["application/json"]["example"]["offer"]
        response, joined = yield self.call(self.base, "POST", participants, {"offer": offer},
                                           want=201, token=None)
        leave = f"{participants}/{joined['association']}"
        self.assertEqual(response.headers.getRawHeaders("location"), [leave])
        _, info = yield self.call(self.base, "GET", "/v1/md", want=200)
        self.assertEqual(info["load"], {"participants": 1, "conferences": 1})
        yield self.call(self.base, "DELETE", leave, want=403, token="not-its-token")
        yield self.call(self.base, "DELETE", leave, want=204, token=joined["leave_token"])
        yield self.call(self.base, "DELETE", leave, want=204, token=joined["leave_token"])
        yield self.call(self.base, "DELETE", f"{participants}/not-a-uuid", want=404,
                        token=joined["leave_token"])
        yield self.call(self.base, "POST", participants, {"offer": "v=0\r\n"}, want=400,
                        token=None)
        self.kd.mode = "refuse"
        yield self.call(self.base, "POST", participants, {"offer": offer}, want=403,
                        token=None)
        yield self.call(self.base, "POST", "/v1/conferences/nope/participants",
                        {"offer": offer}, want=404, token=None)

    def test_md_route_table_is_documented(self):
        """Every (pattern, method) of the running MdApi's routing table is in the document,
        or one of the routes it leaves to docs/API.md; and nothing else is documented."""
        routes = self.md.api._routes
        self.assertGreaterEqual(len(routes), 7)
        served = set()
        for pattern, methods in routes:
            template = route_template(pattern.pattern)
            for method in methods:
                served.add((template, method.decode("ascii").lower()))
        documented = {(path, method) for path, method, _, _ in md_operations(self.spec)}
        self.assertEqual(sorted(served - documented - MD_ROUTES_NOT_DOCUMENTED), [],
                         "served but not documented")
        self.assertEqual(sorted(documented - served), [], "documented but not served")
        # the allow-list names only routes the MD does serve
        self.assertEqual(sorted(MD_ROUTES_NOT_DOCUMENTED - served), [])

    @defer.inlineCallbacks
    def test_md_probed_routes_are_documented(self):
        """Independently of the routing table: OPTIONS every route-like path of md/api.py
        (no MD route serves OPTIONS: 405 with ``Allow``, or 404 from the router)."""
        candidates = candidate_paths(self.spec, md_api.__file__, ("/v1",))
        self.assertGreaterEqual(len(candidates), 7, candidates)
        documented: dict[str, set[str]] = {}
        for path, method, _, _ in md_operations(self.spec):
            documented.setdefault(path, set()).add(method)
        for path, method in MD_ROUTES_NOT_DOCUMENTED:
            documented.setdefault(path, set()).add(method)
        found = set()
        for path in sorted(candidates):
            response, content = yield self.md_request("OPTIONS", self.base + path)
            if response.code == 404:
                self.assertEqual(json.loads(content)["detail"], ROUTER_404, path)
                continue
            self.assertEqual(response.code, 405, path)
            allowed = [m.strip() for m in response.headers.getRawHeaders("allow")[0].split(",")]
            template = documented_template(documented, path.rstrip("/") or "/")
            self.assertIsNotNone(template, f"{path} is served ({allowed}) but not documented")
            for method in allowed:
                self.assertIn(method.lower(), documented[template],
                              f"{method} {path} is served but not documented")
            found.add(template)
        self.assertEqual(len(found), len(self.md.api._routes), sorted(found))


class OpenApiMdPlacementTests(MdChecks, unittest.TestCase):
    """The 307 of a join placed on another process of the host, as documented: two real
    perc-md services naming each other in ``[cluster] processes`` (the set-up of
    :mod:`tests.unit.test_md_cluster`)."""

    timeout = 30
    start_md = md_cluster_tests.PlacementTests.start_md

    def setUp(self):
        self.spec = load_spec()
        md_cluster_tests.PlacementTests.setUp(self)
        self.md_agent = self.agent

    @defer.inlineCallbacks
    def test_md_placement_redirect_is_documented(self):
        self.mds[0].cluster._local_load = lambda: 3  # three participants here, none at B
        join = self.md_operation("/v1/conferences/{cid}/participants", "post")
        offer = join["requestBody"]["content"]["application/json"]["example"]["offer"]
        path = f"/v1/conferences/{md_cluster_tests.CONFERENCE}/participants"
        response, content = yield self.md_request("POST", self.urls[0] + path,
                                                  body={"offer": offer})
        self.assertEqual(response.code, 307, content)
        body = self.assertAnswerDocumented(f"POST {path}", join, response, content)
        self.assertEqual(body, {"placed": self.urls[1]})
        [location] = response.headers.getRawHeaders("location")
        self.assertEqual(location, f"{self.urls[1]}{path}?placed=1")
        # the documented query parameter: the process it names takes the join itself
        [placed] = [resolve(self.spec, p) for p in join["parameters"]
                    if resolve(self.spec, p)["in"] == "query"]
        self.assertEqual(urllib.parse.parse_qs(urllib.parse.urlsplit(location).query),
                         {placed["name"]: placed["schema"]["enum"]})
        self.mds[1].cluster._local_load = lambda: 5
        response, content = yield self.md_request("POST", location, body={"offer": offer})
        self.assertNotEqual(response.code, 307)
        self.assertAnswerDocumented(f"POST {path}?placed=1", join, response, content)
        # the hub's link the placement made is a documented link, at both processes
        for url in self.urls:
            response, content = yield self.md_request(
                "GET", f"{url}/v1/conferences/{md_cluster_tests.CONFERENCE}/links",
                token=md_cluster_tests.TOKEN)
            listed = self.assertAnswerDocumented(
                "GET links", self.md_operation("/v1/conferences/{cid}/links", "get"),
                response, content)
            self.assertEqual(len(listed["links"]), 1)
