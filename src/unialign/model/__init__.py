from .factory import TextTokenizer, create_student, create_tokenizer, eval_transform, load, load_model
from .smke import SMKE, Embeddings, SharedBlock
from .teacher import Teacher
from .towers import TextTower, build_image_tower

__all__ = ["SMKE", "Embeddings", "SharedBlock", "Teacher", "TextTokenizer", "TextTower", "build_image_tower",
           "create_student", "create_tokenizer", "eval_transform", "load", "load_model"]
