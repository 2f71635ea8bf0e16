"""Report generation: tokenizer round trips, the decoder's shapes and gradients, greedy and beam decoding."""

from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from echocare_core.data.text import ReportTokenizer
from echocare_core.models.report import ReportHeadConfig
from echocare_core.tasks import get_task
from echocare_core.tasks.model import EchoCareTaskModel
from echocare_core.tasks.report import report_loss

REPORT = get_task("report")
HEAD = ReportHeadConfig(width=32, depth=1, heads=4, max_tokens=24)


@pytest.mark.parametrize("text", ["A 9 mm anechoic nodule, left.", "甲状腺右叶低回声结节，边界不清。", "Größe: 5 mm"])
def test_byte_level_tokens_round_trip_any_language(text):
    tok = ReportTokenizer(max_tokens=80)
    ids = tok.encode(text)
    assert ids.shape == (80,) and ids[0] == tok.bos and tok.eos in ids.tolist()
    assert tok.decode(ids) == text and tok.vocab_size == 259
    assert ReportTokenizer(tok.to_str(), 80).decode(ids) == text  # as a checkpoint keeps it


def test_special_tokens_in_a_report_are_text_and_a_files_own_padding_is_not_used(tmp_path):
    tok = ReportTokenizer(max_tokens=24)
    ids = tok.encode("a <eos> b").tolist()
    assert ids.count(tok.eos) == 1 and tok.decode(ids) == "a <eos> b"
    words = Tokenizer(models.WordLevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "a": 4}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.enable_padding(length=16)
    words.enable_truncation(2)
    assert ReportTokenizer(words, 8).encode("a a a").tolist() == [1, 4, 4, 4, 2, 0, 0, 0]


def test_long_reports_are_cut_and_still_end():
    tok = ReportTokenizer(max_tokens=8)
    ids = tok.encode("a long report of many words")
    assert ids.tolist()[-1] == tok.eos and tok.decode(ids) == "a long"


def test_a_tokenizer_file_needs_padding_start_and_end_tokens(tmp_path):
    plain = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="no pad token"):
        ReportTokenizer.from_file(tmp_path / "plain.json", 16)
    with pytest.raises(FileNotFoundError, match="model.tokenizer"):
        ReportTokenizer.from_file(tmp_path / "absent.json", 16)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        ReportTokenizer.from_file(tmp_path / "bad.json", 16)
    words = Tokenizer(
        models.WordLevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "nodule": 4, "left": 5}, unk_token="[UNK]")
    )
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "words.json"))
    tok = ReportTokenizer.from_file(tmp_path / "words.json", 6)
    assert tok.encode("nodule left").tolist() == [1, 4, 5, 2, 0, 0] and tok.decode(tok.encode("left")) == "left"


@pytest.mark.parametrize("views", [1, 2])
def test_report_head_shapes_finite_backward_and_per_sample_loss(tiny_encoder_cfg, views):
    head = replace(HEAD, findings=("cyst", "solid nodule"))
    model = EchoCareTaskModel(tiny_encoder_cfg, "report", 259, report=head)
    tok = ReportTokenizer(max_tokens=HEAD.max_tokens)
    ids = torch.stack([tok.encode("cyst, left"), tok.encode("solid nodule, right deep")])
    x = torch.randn(2, views, 1, 64, 64)
    logits, findings = model(x, ids)
    assert logits.shape == (2, HEAD.max_tokens - 1, 259) and findings.shape == (2, 2)
    loss = report_loss(tok, head)((logits, findings), ids)
    assert torch.isfinite(loss)
    loss.backward()
    unused = {"head.view_embed.weight"} if views == 1 else set()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n not in unused
    )
    model.eval()
    out = tuple(o.detach() for o in model(x, ids))
    singles = [report_loss(tok, head)((out[0][i : i + 1], out[1][i : i + 1]), ids[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(report_loss(tok, head)(out, ids), torch.stack(singles).mean())


def test_the_findings_loss_is_labelled_by_what_each_report_states():
    tok, head = (
        ReportTokenizer(max_tokens=40),
        replace(HEAD, max_tokens=40, findings=("cyst", "irregular margin"), findings_weight=0.5),
    )
    ids = torch.stack([tok.encode("a cyst, smooth margin"), tok.encode("cystic? no: an irregular margin")])
    logits, findings = torch.zeros(2, 39, 259), torch.tensor([[20.0, -20.0], [-20.0, 20.0]])  # right on both
    text_only = report_loss(tok)((logits, torch.zeros(2, 0)), ids)
    torch.testing.assert_close(report_loss(tok, head)((logits, findings), ids), text_only, atol=1e-6, rtol=0)
    wrong = report_loss(tok, head)((logits, -findings), ids) - text_only  # 0.5 * BCE of logit -20 for label 1
    torch.testing.assert_close(wrong, torch.tensor(0.5 * 20.0), atol=1e-3, rtol=0)
    assert not ReportHeadConfig(findings=("cyst",), findings_weight=0).classifies


@pytest.mark.parametrize(
    "bad",
    [
        {"findings": ("cyst", "cyst")},
        {"findings": ("Cyst", "cyst")},
        {"findings": ("",)},
        {"findings": ("?",)},
        {"findings_weight": -1.0},
        {"findings_weight": float("nan")},
        {"findings_weight": float("inf")},
    ],
)
def test_bad_findings_settings_are_refused(bad):
    with pytest.raises(ValueError, match="findings"):
        ReportHeadConfig(**bad)


def test_the_loss_ignores_padding():
    logits = torch.randn(1, 5, 259)
    ids = torch.tensor([[1, 40, 41, 2, 0, 0]])
    other = logits.clone()
    other[0, 3:] = torch.randn(2, 259)  # logits after <eos> (their targets are padding)
    loss, none = report_loss(ReportTokenizer()), torch.zeros(1, 0)
    torch.testing.assert_close(loss((logits, none), ids), loss((other, none), ids))


def test_greedy_and_beam_decoding(tiny_encoder_cfg):
    torch.manual_seed(0)
    model = EchoCareTaskModel(tiny_encoder_cfg, "report", 259, report=HEAD).eval()
    x = torch.randn(3, 2, 1, 64, 64)
    greedy, beam1, beam3 = (REPORT.generate(model, x, 1, 2, beam) for beam in (1, 1, 3))
    assert greedy == beam1 and len(beam3) == 3
    assert all(len(r) <= HEAD.max_tokens - 1 and 2 not in r for r in greedy + beam3)
    with pytest.raises(ValueError, match="beam=0"):
        REPORT.generate(model, x, 1, 2, 0)
    with pytest.raises(ValueError, match="reads the report's ids"):
        model(x)


def test_cached_greedy_decoding_equals_recomputing_every_position(tiny_encoder_cfg):
    torch.manual_seed(1)
    model = EchoCareTaskModel(tiny_encoder_cfg, "report", 259, report=HEAD).eval()
    x = torch.randn(2, 2, 1, 64, 64)
    with torch.no_grad():
        memory = model.head.memory(REPORT.views(model, x))
        for i, got in enumerate(REPORT.generate(model, x, 1, 2, beam=1)):
            ids = torch.tensor([[1]])
            for _ in range(HEAD.max_tokens - 1):  # the whole prefix through the decoder at every step
                nxt = model.head.decode(memory[i : i + 1], ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
                if int(nxt) == 2:
                    break
            want = ids[0, 1:].tolist()
            assert got == (want[:-1] if want[-1] == 2 else want) and len(got) > 3


def test_beam_search_finds_a_likelier_report_than_greedy():
    """A decoder whose first token is a trap: greedy takes the likelier first token, beam search the likelier
    report."""
    from echocare_core.models.report import ReportHead

    head = ReportHead(8, 1, 5, ReportHeadConfig(width=8, depth=1, heads=1, max_tokens=4))
    table = {(1,): [0, 0, 0, 0.6, 0.4], (1, 3): [0, 0, 1 / 3, 1 / 3, 1 / 3], (1, 4): [0, 0, 1.0, 0, 0]}

    def log_probs(seqs, cross, caches):  # [K, t] -> log-probabilities of the next token [K, vocab]
        rows = [torch.tensor(table.get(tuple(s.tolist()), [0, 0, 1.0, 0, 0])).clamp_min(1e-9).log() for s in seqs]
        return torch.stack(rows), [(torch.zeros(len(seqs), 1, 1, 8),) * 2]

    head._log_probs = log_probs
    memory = torch.zeros(1, 1, 1, 8)
    assert head.generate(memory, 1, 2, beam=1)[0][0] == 3  # then one of three at 1/3: 0.2 at best
    assert head.generate(memory, 1, 2, beam=2) == [[4]]  # 0.4 with its end


def test_bad_report_head_sizes_are_refused():
    with pytest.raises(ValueError, match="width divisible by heads"):
        ReportHeadConfig(width=30, heads=4)
