"""The chat prompt exactly as InternVL-Chat-V1.5's `batch_chat` builds it (template `internlm2-chat`).

    <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<img><IMG_CONTEXT>*256*tiles</img>\\n{question}<|im_end|><|im_start|>assistant\\n

There is no newline after `<|im_end|>`; the tokenizer adds `<s>` in front.
"""

from __future__ import annotations

TEMPLATE_NAME = "internlm2-chat"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
SEPARATOR = "<|im_end|>"
# The template's system_template and roles (its sep_style MPT joins them with SEPARATOR).
SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}"
ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
STOP_TOKEN = SEPARATOR  # batch_chat stops generation on the template separator only

# The `internlm2-chat` template's system message at current InternVL: used when config.json has none and the
# folder has no conversation.py to take it from.
DEFAULT_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: E501 (verbatim)
# The V1.5-era message (InternVL a08ba33/e81aac3, lmdeploy's V1.5 template), for users who want that vintage.
V15_ENGLISH_SYSTEM_MESSAGE = "You are an AI assistant whose name is InternLM (书生·浦语)."

# The seed's (ROVI vlm_description) caption prompt, the default question.
CAPTION_QUESTION = (
    "Describe the image in one paragraph, in prompt style. Put important things first. First introduce "
    "the overall picture style, such as 'photograph, cartoon, 3d render'. Focus on objects, but be "
    "precise. You shall specify all the clear objects within the image. Omit unclear or tiny objects that"
    " are not major. Pay attention to people, characters, and human activities. Be brief but complete. DO"
    " NOT mention texts. DO NOT include atmosphere, impression, or feeling. DO NOT use guessing words "
    "like 'suggest, appears, indicates, likely, might'; use firm statements instead. DO NOT include "
    "anything you are not sure of. DO NOT use negative statements such as 'with no; There are no'. If the"
    " lighting is special, put it at the end, but ignore the normal situation. Start with 'This is'."
)


def build_prompt(question: str, num_tiles: int, system_message: str, num_image_token: int = 256) -> str:
    """The exact prompt string `batch_chat` sends to the tokenizer for one image of `num_tiles` tiles."""
    if num_tiles < 1:
        raise ValueError(f"an image has at least one tile, got {num_tiles}")
    if IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    # SeparatorStyle.MPT: the system prompt and each message end with SEPARATOR; the assistant's role is left open.
    prompt = (SYSTEM_TEMPLATE.format(system_message=system_message) + SEPARATOR
              + ROLES[0] + question + SEPARATOR + ROLES[1])
    image_tokens = IMG_START + IMG_CONTEXT * (num_image_token * num_tiles) + IMG_END
    # Like the original: the first <image> anywhere in the prompt, even inside a system message.
    return prompt.replace(IMAGE_PLACEHOLDER, image_tokens, 1)
