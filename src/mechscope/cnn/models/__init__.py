"""The CNN models: mechscope's own (:mod:`.cnn`), the spec that reads any conv stack (:mod:`.spec`) and its
hooked view."""
