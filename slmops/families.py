"""Model families: what the pipeline knows of a family of chat models, as configuration.

The chat template a raw-prompt wrapper needs, the special tokens, the prompts validation asks
to check the structure of the answers, and the smoke question a new server must answer.
Production code reads these from here; the embedded tiny Phi-3 (the offline kit) takes its
template and tokens from here too, never the other way round. The validation prompts are not
what the tiny model was trained on (that is the offline kit's, and the `tiny-phi3` evaluation
set's): answers the model never learned are what a real model's validation sees too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ChatFamily(BaseModel):
    """A family of chat models sharing a chat template and special tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    # The Jinja chat template of the family's tokenizer_config.json.
    chat_template: str
    # The family's added special tokens, in the family's id order.
    added_tokens: tuple[str, ...]
    system_prefix: str
    user_prefix: str
    assistant_prefix: str
    turn_end: str
    # Questions any chat model of the family answers with some text (validation checks its
    # structure, not its words); every other one is asked with `validation_system_prompt`.
    validation_prompts: tuple[str, ...]
    validation_system_prompt: str
    smoke_question: str

    def render(self, question: str, system: str | None = None) -> str:
        """One user turn (after an optional system turn) rendered as the chat template does,
        ready for generation: what the raw-prompt wrapper takes."""
        text = f"{self.system_prefix}{system}{self.turn_end}" if system else ""
        return f"{text}{self.user_prefix}{question}{self.turn_end}{self.assistant_prefix}"


PHI3 = ChatFamily(
    name="phi3",
    # Phi-3-mini-4k-instruct's chat template (tokenizer_config.json of the real repo).
    chat_template=(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    added_tokens=(
        "<|endoftext|>",
        "<|assistant|>",
        "<|placeholder1|>",
        "<|placeholder2|>",
        "<|placeholder3|>",
        "<|placeholder4|>",
        "<|system|>",
        "<|end|>",
        "<|placeholder5|>",
        "<|placeholder6|>",
        "<|user|>",
    ),
    system_prefix="<|system|>\n",
    user_prefix="<|user|>\n",
    assistant_prefix="<|assistant|>\n",
    turn_end="<|end|>\n",
    validation_prompts=(
        "Describe a sunrise in one sentence.",
        "Name three kinds of fruit.",
        "Explain in one sentence what a model registry is for.",
        "Write a short greeting for a new colleague.",
    ),
    validation_system_prompt="You are a helpful assistant.",
    smoke_question="What is the capital of Spain?",
)
