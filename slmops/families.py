"""Model families: what the pipeline knows of a family of chat models, as configuration.

The chat template a raw-prompt wrapper needs, the special tokens, the prompts validation asks
(with the answers a model of the family that learned them gives), and the smoke question a new
server must answer. Production code reads these from here; the embedded tiny Phi-3 (the offline
kit) is built from them too, never the other way round.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ValidationPrompt(BaseModel):
    """A question validation asks, and the answer the embedded model of the family gives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    question: str
    answer: str


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
    validation_prompts: tuple[ValidationPrompt, ...]
    # Every other validation prompt is asked with this system prompt.
    validation_system_prompt: str
    smoke_question: str

    def render(self, question: str, system: str | None = None) -> str:
        """One user turn (after an optional system turn) rendered as the chat template does,
        ready for generation: what the raw-prompt wrapper takes."""
        text = f"{self.system_prefix}{system}{self.turn_end}" if system else ""
        return f"{text}{self.user_prefix}{question}{self.turn_end}{self.assistant_prefix}"

    def reference_answers(self) -> dict[str, str]:
        return {p.question: p.answer for p in self.validation_prompts}


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
    validation_prompts=tuple(
        ValidationPrompt(question=q, answer=a)
        for q, a in (
            ("What is the capital of Spain?", "The capital of Spain is Madrid."),
            ("What is the capital of France?", "The capital of France is Paris."),
            ("What is the capital of Italy?", "The capital of Italy is Rome."),
            ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
            ("What is two plus two?", "Two plus two is four."),
            ("What color is the sky?", "The sky is blue."),
            ("Tell me a joke about atom", "Never trust an atom, they make up everything."),
            ("Who are you?", "I am a tiny Phi-3 model built by slmops."),
        )
    ),
    validation_system_prompt="You are a helpful assistant.",
    smoke_question="What is the capital of Spain?",
)
