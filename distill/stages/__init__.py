"""Pipeline stages of the methods beyond guided distillation: each module turns its method's pure pieces
(`distill.methods.<name>`) into `train.Stage`s and registers nothing itself — `pipeline.STAGES` and
`pipeline.STUDENT_SAMPLERS` name their entry points and import them on first use."""
