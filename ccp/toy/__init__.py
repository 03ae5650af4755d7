"""Toy-scale world for reproducing Tables 1-2 offline on a CPU: scikit-learn's real handwritten
digits rendered as coloured RGB images (`ccp.toy.digits`) and the instruments that measure them
(`ccp.toy.instruments`). See docs/toy.md."""
