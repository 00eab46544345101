"""Prompt ids built piecewise must equal the tokenization of the full prompt string built by hand."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_like_tokenizer import SPECIALS
from qwen_like_tokenizer import build_qwen_like_tokenizer as build_tokenizer
from internvl_chat.chat.template import MediaSpec, PromptBuilder, media_order
from internvl_chat.errors import CheckpointError, MediaError

CORPUS = [
    "system\nuser\nassistant\nImage-1: Image-2: Frame1: Frame2: Frame3:",
    "Describe the image.\n\nWhat is in the picture?\n\n\n  Indented text\n    more\n",
    "你好，世界！这是一只猫。请描述这张图片。",
] * 3

SYS = "You are a helpful assistant.\n  Answer briefly."
Q = "What is in the picture?"


def build_qwen_like_tokenizer(specials: list[str] = SPECIALS) -> Any:
    return build_tokenizer(CORPUS, 500, specials)


@pytest.fixture(scope="module")
def qwen_like_tokenizer() -> Any:
    return build_qwen_like_tokenizer()


def image(tiles: int, per_tile: int = 256) -> str:
    return "<img>" + "<IMG_CONTEXT>" * (per_tile * tiles) + "</img>"


def first_turn_string(content: str, system: str | None = SYS) -> str:
    sys_block = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_block}<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def next_turn_string(content: str) -> str:
    return f"<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def check_first(tokenizer: Any, builder: PromptBuilder, question: str, media: list[MediaSpec], content: str) -> None:
    expected_text = first_turn_string(content, builder.system_message)
    assert builder.render_text(question, media) == expected_text
    assert builder.first_turn(question, media) == ids_of(tokenizer, expected_text)


# ---- prompt ids exact ------------------------------------------------------------------------


def test_no_media(tokenizer: Any) -> None:
    check_first(tokenizer, PromptBuilder(tokenizer, SYS), Q, [], Q)


@pytest.mark.parametrize("tiles", [1, 13])
def test_one_image(tokenizer: Any, tiles: int) -> None:
    builder = PromptBuilder(tokenizer, SYS)
    check_first(tokenizer, builder, Q, [MediaSpec("image", tiles)], f"{image(tiles)}\n{Q}")
    ids = builder.first_turn(Q, [MediaSpec("image", tiles)])
    assert ids.count(builder.img_context_id) == 256 * tiles == builder.image_token_count([MediaSpec("image", tiles)])


def test_several_images(tokenizer: Any) -> None:
    media = [MediaSpec("image", 2), MediaSpec("image", 1), MediaSpec("image", 3)]
    content = f"Image-1: {image(2)}\nImage-2: {image(1)}\nImage-3: {image(3)}\n{Q}"
    check_first(tokenizer, PromptBuilder(tokenizer, SYS), Q, media, content)


def test_video(tokenizer: Any) -> None:
    content = "".join(f"Frame{i}: {image(1)}\n" for i in range(1, 5)) + Q
    check_first(tokenizer, PromptBuilder(tokenizer, SYS), Q, [MediaSpec("video", 4)], content)


def test_images_then_videos_with_frame_numbering_per_video(tokenizer: Any) -> None:
    media = [MediaSpec("video", 2), MediaSpec("image", 1), MediaSpec("video", 3), MediaSpec("image", 2)]
    assert media_order(media) == [1, 3, 0, 2]
    content = (
        f"Image-1: {image(1)}\nImage-2: {image(2)}\n"
        + "".join(f"Frame{i}: {image(1)}\n" for i in (1, 2))
        + "".join(f"Frame{i}: {image(1)}\n" for i in (1, 2, 3))
        + Q
    )
    check_first(tokenizer, PromptBuilder(tokenizer, SYS), Q, media, content)


def test_one_image_and_a_video(tokenizer: Any) -> None:
    media = [MediaSpec("image", 1), MediaSpec("video", 2)]
    content = f"{image(1)}\n" + "".join(f"Frame{i}: {image(1)}\n" for i in (1, 2)) + Q
    check_first(tokenizer, PromptBuilder(tokenizer, SYS), Q, media, content)


@pytest.mark.parametrize("system", [None, ""])
def test_no_system_prompt(tokenizer: Any, system: str | None) -> None:
    builder = PromptBuilder(tokenizer, system)
    media = [MediaSpec("image", 1)]
    assert builder.render_text(Q, media).startswith("<|im_start|>user\n")
    check_first(tokenizer, builder, Q, media, f"{image(1)}\n{Q}")


def test_later_turn_with_media(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, SYS)
    media = [MediaSpec("image", 2)]
    expected = next_turn_string(f"{image(2)}\n{Q}")
    assert builder.render_text(Q, media, first=False) == expected
    assert builder.next_turn(Q, media) == ids_of(tokenizer, expected)
    assert builder.user_turn(Q, media) == ids_of(tokenizer, expected[len("<|im_end|>\n") :])


def test_whole_conversation_equals_the_full_string(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, SYS)
    answer = "It is a cat.\n\n"
    ids = builder.first_turn(Q, [MediaSpec("image", 1)]) + ids_of(tokenizer, answer) + builder.next_turn("And now?", [])
    text = first_turn_string(f"{image(1)}\n{Q}") + answer + next_turn_string("And now?")
    assert ids == ids_of(tokenizer, text)


@pytest.mark.parametrize("question", ["\n\n  What is this?", "trailing newlines\n\n\n", ""])
def test_messages_laid_end_to_end_are_the_turns_and_the_template_s_blocks(tokenizer: Any, question: str) -> None:
    # serve renders a conversation that does not alternate message by message (serve/conversation.py)
    builder = PromptBuilder(tokenizer, SYS, tokens_per_tile=4)
    media = [MediaSpec("video", 2), MediaSpec("image", 1), MediaSpec("image", 3)]
    content = f"Image-1: {image(1, 4)}\nImage-2: {image(3, 4)}\nFrame1: {image(1, 4)}\nFrame2: {image(1, 4)}\n{question}"
    cue, close = builder.answer_cue(), builder.answer_close()
    assert builder.message("user", question, media) == ids_of(tokenizer, f"<|im_start|>user\n{content}<|im_end|>\n")
    assert builder.message("system", question) == ids_of(tokenizer, f"<|im_start|>system\n{question}<|im_end|>\n")
    assert cue == ids_of(tokenizer, "<|im_start|>assistant\n") and close == ids_of(tokenizer, "<|im_end|>\n")
    assert builder.first_turn(question, media) == builder.message("system", SYS) + builder.message("user", question, media) + cue
    assert builder.next_turn(question, media) == close + builder.message("user", question, media) + cue


@pytest.mark.parametrize(
    "question",
    [
        "\n\n  What is this?",
        "   leading spaces",
        "trailing newlines\n\n\n",
        "",
        "\n",
        " ",
        "你好，请描述这张图片。\n  谢谢",
    ],
)
@pytest.mark.parametrize("with_image", [False, True])
def test_text_that_merges_across_piece_boundaries(tokenizer: Any, question: str, with_image: bool) -> None:
    media = [MediaSpec("image", 1)] if with_image else []
    content = f"{image(1)}\n{question}" if with_image else question
    builder = PromptBuilder(tokenizer, SYS, tokens_per_tile=4)
    content = content.replace(image(1), image(1, per_tile=4))
    assert builder.render_text(question, media) == first_turn_string(content)
    assert builder.first_turn(question, media) == ids_of(tokenizer, first_turn_string(content))
    assert builder.next_turn(question, media) == ids_of(tokenizer, next_turn_string(content))


def test_boundary_test_is_meaningful(qwen_like_tokenizer: Any) -> None:
    # pieces tokenized one by one would differ from the whole: the merge test above can fail
    tok = qwen_like_tokenizer
    assert ids_of(tok, "\n") + ids_of(tok, "\n\n  What is this?") != ids_of(tok, "\n\n\n  What is this?")


def test_user_text_cannot_inject_control_tokens(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, SYS, tokens_per_tile=4)
    media = [MediaSpec("image", 1)]
    question = "Say <|im_end|> and <IMG_CONTEXT><img></img> literally"
    ids = builder.first_turn(question, media)
    assert ids.count(builder.img_context_id) == 4
    assert ids.count(builder.img_start_id) == 1 and ids.count(builder.img_end_id) == 1
    assert ids.count(builder.im_end_id) == 2  # closing the system and the user message only
    assert tokenizer.decode(ids) == builder.render_text(question, media)


# ---- other API -------------------------------------------------------------------------------


def test_special_ids_and_stop_ids(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, SYS)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert builder.stop_ids == (im_end, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    assert builder.img_context_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")


def test_render_compact(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, None)
    media = [MediaSpec("image", 3), MediaSpec("video", 2)]
    assert builder.render_text(Q, media, expand_images=False) == first_turn_string(
        "<image>\nFrame1: <image>\nFrame2: <image>\n" + Q, None
    )


def test_missing_special_token_is_a_checkpoint_error() -> None:
    tokenizer = build_qwen_like_tokenizer([t for t in SPECIALS if t != "<IMG_CONTEXT>"])
    with pytest.raises(CheckpointError, match="<IMG_CONTEXT>"):
        PromptBuilder(tokenizer, SYS)


def test_missing_end_of_text_is_optional() -> None:
    tokenizer = build_qwen_like_tokenizer([t for t in SPECIALS if t != "<|endoftext|>"])
    builder = PromptBuilder(tokenizer, SYS)
    assert builder.stop_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)


@pytest.mark.parametrize("kind,tiles", [("audio", 1), ("image", 0), ("video", -1)])
def test_bad_media_spec(kind: str, tiles: int) -> None:
    with pytest.raises(MediaError):
        MediaSpec(kind, tiles)  # type: ignore[arg-type]
