"""JSON mode (response_format) in process, on the real default models: the grammar masks every token the target
decides, drafted nodes it forbids are pruned before verification, and `gsd`'s output is `ar`'s, greedy and sampled.
The served checks (router, frontend, gRPC, the official client) are in test_openai_params.py and
test_services_serving.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.grammar import GrammarError, ResponseFormat, parse_response_format
from gsd_serve.core.graph import VerifyTree
from gsd_serve.core.prompts import encode
from gsd_serve.core.sampling import SamplingParams

pytestmark = pytest.mark.timeout(900)

AR = SpecConfig.for_method("ar")
# every round drafts its whole budget (no planner: on a busy machine the planner may decode plainly throughout)
GSD = SpecConfig.for_method("gsd", max_depth=4, budget=12, planner=False)
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
JSON_OBJECT = ResponseFormat("json_object")


@pytest.fixture(scope="module")
def grammars(engine, tokenizer):
    from gsd_serve.core.grammar import GrammarCompiler

    return GrammarCompiler(tokenizer, engine.stop_token_ids, engine.target.vocab_size)


def chat(tokenizer, text: str) -> list[int]:
    return encode(tokenizer, {"messages": [{"role": "user", "content": text}]})


def is_person(value) -> bool:
    """PERSON's schema, checked by hand."""
    return isinstance(value, dict) and set(value) == {"name", "age"} and isinstance(value["name"], str) \
        and isinstance(value["age"], int) and not isinstance(value["age"], bool)


def test_response_format_values():
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == JSON_OBJECT
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert fmt.kind == "json_schema" and json.loads(fmt.schema) == PERSON
    for bad in ("json", {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
                {"type": "json_schema", "json_schema": {"schema": "{}"}}, {}.get("x", 3)):
        with pytest.raises(GrammarError, match="response_format"):
            parse_response_format(bad)


def test_bad_schema_is_refused(grammars):
    grammars.check(parse_response_format({"type": "json_schema", "json_schema": {"schema": PERSON}}))
    with pytest.raises(GrammarError, match="response_format"):
        grammars.check(parse_response_format({"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}))


def test_prune_drops_forbidden_nodes_and_their_subtrees(grammars, tokenizer):
    """A hand-made tree: the kept nodes are those whose token the grammar allows after their path, in the same
    order with their parents re-linked; a stop token is kept where the object is complete and nothing under it;
    the grammar's state is where it was before."""
    brace, quote, close, word = (tokenizer.convert_tokens_to_ids(t) for t in ("{", '"', "}", "hello"))
    stop = grammars.stop_ids[0]
    # node:     0 root 1 {    2 hello 3 "    4 }    5 "   6 }    7 stop 8 {   9 stop
    tokens = [0, brace, word, quote, close, quote, close, stop, brace, stop]
    parents = [-1, 0, 0, 1, 1, 2, 4, 4, 7, 0]
    depths = [0, 1, 1, 2, 2, 2, 3, 3, 4, 1]
    tree = VerifyTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), list(range(10)),
                      [1.0 - i / 20 for i in range(10)])
    g = grammars.constraint(JSON_OBJECT)
    kept = g.prune(tree)
    assert kept.nodes == [0, 1, 3, 4, 7] and kept.parents.tolist() == [-1, 0, 1, 1, 3]
    assert kept.tokens.tolist() == [0, brace, quote, close, stop] and kept.depths.tolist() == [0, 1, 2, 2, 3]
    assert kept.path_probs == [tree.path_probs[i] for i in kept.nodes]
    assert g.pruned == 5
    assert not g.consume([stop]) and g.consume([brace])        # nothing of the pruning was left consumed
    mark = g.state()
    assert g.consume([close]) and g.is_finished() and not g.consume([word])
    assert g.consume([stop]) and not g.consume([brace])
    g.restore(mark)                                             # back to `{`: a verification done again
    assert not g.is_finished() and g.consume([quote])


def test_greedy_json_ar_and_gsd_identical(engine, tokenizer, grammars):
    """Greedy JSON mode: gsd's tokens are ar's; the text parses whenever the grammar ended it; drafted nodes the
    grammar forbade were pruned."""
    prompts = [("Reply with a JSON object with the keys city and country for Paris.", 24),   # ends in 19 tokens
               ("Give me a JSON object describing a cat.", 16)]
    pruned, ended = 0, 0
    for text, max_tokens in prompts:
        ids = chat(tokenizer, text)
        want = engine.generate(ids, max_tokens, AR, grammar=grammars.constraint(JSON_OBJECT))
        got = engine.generate(ids, max_tokens, GSD, grammar=grammars.constraint(JSON_OBJECT))
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason, text
        out = tokenizer.decode(got.token_ids, skip_special_tokens=True)
        assert out.startswith("{")
        if got.finish_reason == "stop":
            assert isinstance(json.loads(out), dict)
            ended += 1
        pruned += got.stats.grammar_pruned
        assert want.stats.grammar_pruned == 0
    assert pruned > 0 and ended > 0


def test_json_schema_output_validates(engine, tokenizer, grammars):
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"schema": PERSON}})
    ids = chat(tokenizer, "Describe a person as JSON with name and age.")
    want = engine.generate(ids, 32, AR, grammar=grammars.constraint(fmt))
    got = engine.generate(ids, 32, GSD, grammar=grammars.constraint(fmt))
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    assert is_person(json.loads(tokenizer.decode(got.token_ids, skip_special_tokens=True)))
    free = engine.generate(ids, 6, AR)       # the same prompt without the constraint is not this JSON
    assert free.token_ids != got.token_ids[:6]


def test_sampled_json_reproduces_with_a_seed(engine, tokenizer, grammars):
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"schema": PERSON}})
    ids = chat(tokenizer, "Make up a person and give their name and age as JSON.")
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    # the seed's sample, whichever method decodes it (the draft proposes differently in each round)
    runs = [engine.generate(ids, 32, spec, sampling, grammar=grammars.constraint(fmt)) for spec in (AR, GSD)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].finish_reason == "stop"
    assert is_person(json.loads(tokenizer.decode(runs[0].token_ids, skip_special_tokens=True)))


def test_generate_cli_json_schema(engine, tokenizer, monkeypatch, capsys, tmp_path):
    from gsd_serve.cli import generate
    from gsd_serve.cli.main import main

    monkeypatch.setattr(generate, "build_engine", lambda args, method=None: (engine, tokenizer))
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    args = ["generate", "--prompt", "Describe a person as JSON with name and age.", "--max-new-tokens", "32",
            "--json"]
    assert main([*args, "--method", "gsd", "--json-schema", str(schema)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["finish_reason"] == "stop" and is_person(json.loads(row["text"]))
    schema.write_text("{not json")
    assert main([*args, "--json-schema", str(schema)]) != 0
    assert "--json-schema" in capsys.readouterr().err
