"""Messages in any order the chat template renders: serve builds the ids `apply_chat_template` gives.

Clients send two user messages in a row (a picture, then its question), two assistant messages,
or a system reminder mid-conversation; the InternVL3 chat template renders each message as its own
`<|im_start|>{role}\\n…<|im_end|>\\n` block, in order. The ids serve builds are compared with
transformers' `apply_chat_template` under the real InternVL3 (-hf) template and under the tiny
checkpoint's own (a simplified ChatML that renders string contents the same way). Each user
message's content is written as the original InternVL lays it out (SPEC §3: its media first,
`Image-k:` / `FrameK:` labels, each `<image>` one `<img>…</img>` run), serve's documented layout,
which the -hf processor does not reproduce (it puts parts in the order sent, without labels).
"""

from __future__ import annotations

import base64
import json

import pytest

from internvl_chat.serve.protocol import parse_request
from media_helpers import textured_rgb
from serve_support import jpeg_frames_url, png_bytes

# The chat template of OpenGVLab's InternVL3-*-hf tokenizer_config.json (transformers' InternVL
# conversion writes it): every message a block in the order given, no system message added.
INTERNVL3_HF_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

SQUARE = ("image", 1)  # 448×448: one tile
WIDE = ("image", 3)  # 900×450: 2×1 and the thumbnail
CLIP = ("video", 2)  # two pre-sampled frames, one tile each


@pytest.fixture(scope="module")
def urls() -> dict:
    def png(width: int, height: int, seed: int) -> str:
        return "data:image/png;base64," + base64.b64encode(png_bytes(textured_rgb(width, height, seed))).decode()

    return {
        SQUARE: png(448, 448, 7),
        WIDE: png(900, 450, 5),
        CLIP: jpeg_frames_url([textured_rgb(64, 48, seed=k) for k in (1, 2)]),
    }


def part(media, urls) -> dict:
    kind = media[0]
    return {"type": f"{kind}_url", f"{kind}_url": {"url": urls[media]}}


def request_messages(conversation, urls) -> list[dict]:
    """(role, text, media) triples → the request's messages (media parts after the text, as many clients send)."""
    out = []
    for role, text, media in conversation:
        content = [{"type": "text", "text": text}, *(part(m, urls) for m in media)] if media else text
        out.append({"role": role, "content": content})
    return out


def original_content(text: str, media, tokens_per_tile: int) -> str:
    """A user message's content as the original InternVL writes it (SPEC §3), images expanded."""

    def image(tiles: int) -> str:
        return "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * tiles) + "</img>"

    images = [tiles for kind, tiles in media if kind == "image"]
    videos = [frames for kind, frames in media if kind == "video"]
    out = f"{image(images[0])}\n" if len(images) == 1 else "".join(f"Image-{n}: {image(t)}\n" for n, t in enumerate(images, 1))
    for frames in videos:
        out += "".join(f"Frame{n}: {image(1)}\n" for n in range(1, frames + 1))
    return out + text


def template_ids(tokenizer, template, default_system, conversation, tokens_per_tile: int) -> list[int]:
    """The ids the template gives, with serve's documented system message: the leading system and
    developer messages joined by newlines, else the server's default (the original's chat() adds it)."""
    lead = 0
    while conversation[lead][0] in (S, D):
        lead += 1
    system = "\n".join(text for _, text, _ in conversation[:lead]) if lead else default_system
    messages = [{"role": "system", "content": system}] if system else []
    for role, text, media in conversation[lead:]:
        role = "system" if role == "developer" else role  # serve reads a developer message as a system one
        messages.append({"role": role, "content": original_content(text, media, tokens_per_tile)})
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def served_prompt(server, messages):
    body = {"model": "tiny", "messages": messages, "max_tokens": 1}
    return server.worker.prompts.make(parse_request(json.dumps(body).encode()))


U, A, S, D = "user", "assistant", "system", "developer"
CONVERSATIONS = {
    "a picture, then its question": [(U, "", [WIDE]), (U, "What is in this picture?", [])],
    "a question, then its pictures": [(U, "Compare these.", []), (U, "Here they are.", [SQUARE, WIDE])],
    "two replies in a row": [(U, "Hi there.", []), (A, "Hello.", []), (A, "How can I help?", []), (U, "Look.", [SQUARE])],
    "a reminder mid-conversation": [(U, "Describe it.", [WIDE]), (A, "A gradient.", []), (S, "Answer in one word.", []),
                                    (U, "Colour?", [])],
    "developer messages first and later": [(D, "Be brief.", []), (U, "What happens?", [CLIP, SQUARE]),
                                           (A, "Frames change.", []), (D, "Mention the frame numbers.", []),
                                           (U, "And now?", [CLIP])],
    "a greeting first": [(A, "Welcome! Send me a picture.", []), (U, "Here.", [SQUARE])],
    "a reminder last": [(U, "Tell me about this.", [SQUARE]), (S, "Reply in French.", [])],
    "everything at once": [(U, "One.", []), (A, "Two.", []), (U, "Three.", [SQUARE]), (U, "Four.", [WIDE]),
                           (A, "Five.", []), (A, "Six.", []), (S, "Seven.", []), (D, "Eight.", []), (U, "Nine?", [CLIP])],
    "alternating, as before": [(U, "First.", [WIDE]), (A, "Answer.", []), (U, "Second.", [])],
}  # fmt: skip


@pytest.mark.parametrize("template", ["internvl3-hf", "checkpoint"])
@pytest.mark.parametrize("system", [None, "You are terse.", ""])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_messages_in_any_order_are_rendered_as_the_chat_template_renders_them(
    server, tiny_loaded_tokenizer, urls, name, system, template
):
    # two user (or assistant) messages in a row and a system message past the first were refused with 400
    conversation = ([(S, system, [])] if system is not None else []) + CONVERSATIONS[name]
    prompt = served_prompt(server, request_messages(conversation, urls))
    chat_template = INTERNVL3_HF_TEMPLATE if template == "internvl3-hf" else None  # None: the tokenizer's own
    default, tokens_per_tile = server.worker.prompts.default_system, server.loaded.config.tokens_per_tile
    assert prompt.ids == template_ids(tiny_loaded_tokenizer, chat_template, default, conversation, tokens_per_tile)
    # every image run is recorded, in prompt order, with its media's tiles
    in_order = [m for _, _, media in conversation for m in sorted(media, key=lambda m: m[0] != "image")]
    assert [(m.kind, m.tiles) for m in prompt.media] == in_order
    context = [k for k, token in enumerate(prompt.ids) if token == server.prompt_builder().img_context_id]
    assert sum(s.end - s.start - 2 for s in prompt.spans) == len(context)


def test_the_leading_system_messages_are_one_system_block(server, tiny_loaded_tokenizer, urls):
    # the one system message the Session holds (documented: joined by newlines); a later one is its own block
    messages = [{"role": "system", "content": "A."}, {"role": "developer", "content": "B."},
                {"role": "user", "content": "Q."}, {"role": "system", "content": "C."}]  # fmt: skip
    rendered = [{"role": "system", "content": "A.\nB."}, {"role": "user", "content": "Q."}, {"role": "system", "content": "C."}]
    text = tiny_loaded_tokenizer.apply_chat_template(rendered, chat_template=INTERNVL3_HF_TEMPLATE, tokenize=False,
                                                     add_generation_prompt=True)  # fmt: skip
    assert served_prompt(server, messages).ids == tiny_loaded_tokenizer(text, add_special_tokens=False).input_ids



@pytest.mark.parametrize("role", ["leading system", "later system", "assistant", "assistant refusal", "user"])
def test_text_parts_are_joined_by_newlines_in_every_role(server, role):
    """A user message's text parts were joined by newlines, a system or assistant message's by
    nothing: "a" and "b" became "ab", a word the client never sent."""
    second = {"type": "refusal", "refusal": "Another."} if role == "assistant refusal" else {"type": "text", "text": "Another."}
    parts, joined = [{"type": "text", "text": "One part."}, second], "One part.\nAnother."
    before = [] if role == "leading system" else [{"role": "user", "content": "Q."}]
    name = role.split()[-1] if role.endswith("system") else role.split()[0]

    def ids(content) -> list[int]:
        return served_prompt(server, [*before, {"role": name, "content": content}, {"role": "user", "content": "Next?"}]).ids

    assert ids(parts) == ids(joined) != ids("One part.Another.")


def test_an_assistant_s_text_and_refusal_are_joined_by_a_newline(server):
    def ids(assistant: dict) -> list[int]:
        messages = [{"role": "user", "content": "Q."}, {"role": "assistant", **assistant}, {"role": "user", "content": "Next?"}]
        return served_prompt(server, messages).ids

    assert ids({"content": "Partly.", "refusal": "No more."}) == ids({"content": "Partly.\nNo more."})
    assert ids({"content": None, "refusal": "No."}) == ids({"content": "No."})

def complete(client, messages):
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                         extra_body={"return_token_ids": True})  # fmt: skip
    choice = out.choices[0]
    return choice.message.content, choice.model_extra["token_ids"], out


def held_after(out, ids: list[int]) -> int:
    """What the slot's cache holds after an answer: its prompt and answer (a token that hit the
    length limit was sampled but never fed to the model)."""
    return out.usage.prompt_tokens + len(ids) - (out.choices[0].finish_reason == "length")


def test_a_follow_up_to_a_conversation_out_of_alternation_reuses_its_cache(server, client, urls):
    # the picture and its question as two user messages, then our reply, a system reminder and a question,
    # then two assistant messages in a row (ours and one the client wrote): each request prefills only its new tokens
    messages = request_messages([(U, "", [WIDE]), (U, "What is in this picture?", [])], urls)
    text, ids, out = complete(client, messages)
    assert server.worker.answers.lookup(text) == ids  # our reply, found again by its text when resent
    held = held_after(out, ids)

    messages += [{"role": "assistant", "content": text}, {"role": "system", "content": "Answer in one word."},
                 {"role": "user", "content": "Colour?"}]  # fmt: skip
    text, ids, out = complete(client, messages)
    assert out.usage.prompt_tokens_details.cached_tokens == held
    assert out.model_extra["timings"]["prompt_n"] == out.usage.prompt_tokens - held
    held = held_after(out, ids)

    messages += [{"role": "assistant", "content": text}, {"role": "assistant", "content": "Also: it is wide."},
                 {"role": "user", "content": "Why?"}, {"role": "user", "content": "Be brief."}]  # fmt: skip
    _, _, out = complete(client, messages)
    assert out.usage.prompt_tokens_details.cached_tokens == held
    assert out.usage.prompt_tokens == len(served_prompt(server, messages).ids)
