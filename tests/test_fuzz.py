"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation gets schemathesis' coverage cases (boundaries, each parameter made invalid in turn,
unexpected methods) and hypothesis-generated requests, valid and invalid, derandomized so a run is
repeatable. Valid requests also draw real product ids, filter values and event bodies from the tiny
catalog, so the 200 answers (not only the 404/422 ones) are checked against the documented schema.
Every response must be: not a 5xx, a documented status code, the documented content type and headers,
and a body that matches the documented schema; invalid input must be refused with a 4xx.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from serving.api import ApiSettings, create_app
from tests.serving_fixtures import API_KEY, local_backend, serving_data_copy, tiny_ids

# Schemathesis sends the API key where the schema asks for it (HTTPBearer), and leaves it out or sends
# a wrong one in the cases that test authentication.
AUTH_CONFIG = schemathesis.config.SchemathesisConfig.from_dict(
    {"auth": {"openapi": {"HTTPBearer": {"bearer": API_KEY}}}}
)


@dataclass(frozen=True)
class FuzzConfig:
    """How much to generate; sized so the whole file runs in well under a minute on 2 cores."""

    valid_examples: int = 60  # hypothesis examples of valid requests per operation (max_examples)
    invalid_examples: int = 45  # ... of requests with at least one invalid part, where one exists
    starting_examples: int = 8  # ... per operation against a server whose backend is not up yet
    min_generated: int = 1000  # hypothesis-generated requests (valid + invalid) the run must send in all


CONFIG = FuzzConfig()
CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,  # an invalid request must get a 4xx, never a 200
    openapi_checks.ignored_auth,  # writes declared as needing the key really refuse requests without it
]
# A server that is starting answers 503 on purpose: every check but "not a 5xx".
STARTING_CHECKS = CHECKS[1:]
# The operations, read from the schema of an app without a backend (the schema never depends on it).
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, methods in create_app(None).openapi()["paths"].items()
    for method in methods
]
FILTER_VALUES = {
    "gender": ["Men", "Women"],
    "masterCategory": ["Accessories", "Apparel"],
    "subCategory": ["Bags", "Watches", "Topwear"],
    "articleType": ["Handbags", "Watches", "Tshirts"],
    "baseColour": ["Red", "Blue", "Green"],
}


@dataclass
class FuzzResult:
    statuses: Counter = field(default_factory=Counter)  # (phase, status code) -> requests
    failures: list[str] = field(default_factory=list)  # one readable report per failing request

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


def _settings(max_examples: int) -> settings:
    # derandomize: the same requests on every run (a failure reproduces); no example database, so
    # nothing is written to the tree and a past run cannot change what this one sends.
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are recorded, not raised
        suppress_health_check=list(HealthCheck),
    )


def _send(case: Any, result: FuzzResult, phase: str, checks: list = CHECKS) -> None:
    """Send one case and check the response."""
    response = case.call()
    result.statuses[(phase, response.status_code)] += 1
    try:
        case.validate_response(response, checks=checks)
    # A check failure, or a FailureGroup (a BaseExceptionGroup) of several, with a curl to reproduce.
    except (Exception, BaseExceptionGroup) as exc:
        result.failures.append(f"[{phase}] {response.status_code}: {exc}"[:2000])


def _real_values(operation: Any) -> st.SearchStrategy:
    """Valid requests built around real catalog values: a real product id in the path, a real filter
    value, or a well-formed batch of events for real products."""
    path = {p.name for p in operation.path_parameters}
    query = {p.name for p in operation.query}
    product_ids = st.sampled_from(tiny_ids())
    strategies = []
    if "product_id" in path:
        strategies.append(
            product_ids.flatmap(lambda pid: operation.as_strategy(path_parameters={"product_id": pid}))
        )
    filters = [name for name in FILTER_VALUES if name in query]
    if filters:
        chosen = st.sampled_from(filters).flatmap(
            lambda name: st.sampled_from(FILTER_VALUES[name]).map(lambda value: {name: value})
        )
        if "product_id" in path:
            strategies.append(
                st.tuples(product_ids, chosen).flatmap(
                    lambda pair: operation.as_strategy(path_parameters={"product_id": pair[0]}, query=pair[1])
                )
            )
        else:
            strategies.append(chosen.flatmap(lambda q: operation.as_strategy(query=q)))
    if operation.label == "POST /events":
        event = st.fixed_dictionaries(
            {
                "event_id": st.text(min_size=1, max_size=40),
                "user_id": st.text(min_size=1, max_size=60),
                "product_id": product_ids,
                "type": st.sampled_from(["view", "click", "cart", "purchase"]),
            },
            optional={"ts": st.floats(0, 2e9), "request_id": st.text(max_size=20)},
        )
        bodies = st.lists(event, min_size=1, max_size=5).map(lambda events: {"events": events})
        strategies.append(bodies.flatmap(lambda body: operation.as_strategy(body=body)))
    return st.one_of(operation.as_strategy(), *strategies)


def _hypothesis_phase(strategy: st.SearchStrategy, examples: int, send) -> None:
    @given(case=strategy)
    @_settings(examples)
    def run(case: Any) -> None:
        send(case)

    try:
        run()
    except Unsatisfiable:  # no invalid request exists (e.g. an operation without parameters)
        pass


def fuzz_operation(schema: Any, label: str, config: FuzzConfig = CONFIG) -> FuzzResult:
    """Coverage cases, then valid and invalid generated requests, for one operation."""
    operation = schema.find_operation_by_label(label)
    result = FuzzResult()
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    generation = schema.config.generation_for(operation=operation)
    for case in schema.iter_coverage_cases(operation, generation_modes=modes, generation_config=generation):
        _send(case, result, "coverage")
    _hypothesis_phase(_real_values(operation), config.valid_examples, lambda c: _send(c, result, "valid"))
    _hypothesis_phase(
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        config.invalid_examples,
        lambda c: _send(c, result, "invalid"),
    )
    return result


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory):
    """The app over a private copy of the tiny serving fixture, loaded into schemathesis."""
    data_dir = serving_data_copy(tmp_path_factory, "fuzz")
    recommender, backend = local_backend(data_dir)
    app = create_app(backend, ApiSettings(api_key=API_KEY))
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=AUTH_CONFIG)
    recommender.close()


@pytest.fixture(scope="module")
def results(schema) -> dict[str, FuzzResult]:
    """Fuzz results by operation, each operation fuzzed once (by its test, or by the total's test)."""
    found: dict[str, FuzzResult] = {}

    class Lazy(dict):
        def __missing__(self, label: str) -> FuzzResult:
            found[label] = self[label] = fuzz_operation(schema, label)
            return found[label]

    return Lazy()


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzzing_finds_no_5xx_and_no_schema_violation(results: dict[str, FuzzResult], label: str) -> None:
    result = results[label]
    assert result.requests > 0
    assert not result.failures, f"{len(result.failures)} failing requests:\n" + "\n\n".join(
        result.failures[:5]
    )
    if label != "GET /visitor":  # every other operation reads the recommender: a 200 must be among them
        assert any(status == 200 for _, status in result.statuses), result.statuses


def test_fuzzing_generated_at_least_1000_requests(results: dict[str, FuzzResult]) -> None:
    rows = [(label, results[label]) for label in OPERATIONS]
    total = sum(r.requests for _, r in rows)
    by_status, by_phase = Counter(), Counter()
    for _, r in rows:
        for (phase, status), n in r.statuses.items():
            by_status[status] += n
            by_phase[phase] += n
    print(f"\nfuzzed {total} requests over {len(rows)} operations; by phase {dict(by_phase)}")
    print(f"by status {dict(sorted(by_status.items()))}")
    for label, r in rows:
        print(f"  {r.requests:5d}  {label}")
    # Coverage cases come on top: the 1000 are hypothesis' own (max_examples per operation).
    assert by_phase["valid"] + by_phase["invalid"] >= CONFIG.min_generated, dict(by_phase)
    assert not [label for label, r in rows if r.failures]
    assert not any(status >= 500 for status in by_status)


def test_a_starting_server_answers_only_documented_statuses() -> None:
    """Before the backend is attached (a Ray ingress starting up) every operation must still answer
    with a documented status: 503 where the recommender is needed."""
    starting = schemathesis.openapi.from_asgi("/openapi.json", create_app(None))
    result = FuzzResult()
    for label in OPERATIONS:
        operation = starting.find_operation_by_label(label)
        _hypothesis_phase(
            operation.as_strategy(),
            CONFIG.starting_examples,
            lambda c: _send(c, result, "starting", STARTING_CHECKS),
        )
    statuses = {status for _, status in result.statuses}
    assert not result.failures, "\n\n".join(result.failures[:5])
    assert 503 in statuses and statuses <= {200, 401, 403, 422, 415, 503}, statuses


def test_the_checks_catch_an_undocumented_status(tmp_path: Path) -> None:
    """The checks are live: an app answering a status its schema does not declare fails them."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    lying = FastAPI()

    @lying.get("/thing", responses={404: {"description": "missing"}})
    async def thing(k: int = 1):
        return JSONResponse({"oops": True}, status_code=409 if k > 5 else 200)

    schema = schemathesis.openapi.from_asgi("/openapi.json", lying)
    result = FuzzResult()
    _hypothesis_phase(
        schema.find_operation_by_label("GET /thing").as_strategy(), 50, lambda c: _send(c, result, "valid")
    )
    assert result.failures and "Undocumented" in " ".join(result.failures)
