// The command-line driver of the CPU emulation of `kernels.cu` (see `emulate.h`), built
// and run by the kernel tests in `kernel_calls.rs`.

#define TUNEFORGE_EMULATE
#include "kernels.cu"

#define ENTRIES(NAME)                                                                                        \
    {"tf_norm_fwd_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_norm_fwd_##NAME, g, b, a); }},     \
        {"tf_norm_grad_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_norm_grad_##NAME, g, b, a); }}, \
        {"tf_softmax_fwd_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_softmax_fwd_##NAME, g, b, a); }}, \
        {"tf_softmax_grad_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_softmax_grad_##NAME, g, b, a); }}, \
        {"tf_gelu_fwd_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_gelu_fwd_##NAME, g, b, a); }},   \
        {"tf_gelu_grad_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_gelu_grad_##NAME, g, b, a); }}, \
        {"tf_dropout_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_dropout_##NAME, g, b, a); }},     \
        {"tf_bias_add_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_bias_add_##NAME, g, b, a); }}, \
        {"tf_swiglu_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_swiglu_##NAME, g, b, a); }},       \
        {"tf_swiglu_grad_gate_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_swiglu_grad_gate_##NAME, g, b, a); }}, \
        {"tf_swiglu_grad_up_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_swiglu_grad_up_##NAME, g, b, a); }}, \
        {"tf_rope_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_rope_##NAME, g, b, a); }},           \
        {"tf_xent_fwd_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_xent_fwd_##NAME, g, b, a); }},   \
        {"tf_xent_grad_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_xent_grad_##NAME, g, b, a); }}, \
        {"tf_sum_squares_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_sum_squares_##NAME, g, b, a); }}, \
        {"tf_embedding_grad_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_embedding_grad_##NAME, g, b, a); }}, \
        {"tf_adam_moments_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_adam_moments_##NAME, g, b, a); }}, \
        {"tf_adam_apply_" #NAME, [](dim3 g, dim3 b, EmuArgs& a) { emu_launch(tf_adam_apply_##NAME, g, b, a); }}

int main(int argc, char** argv) {
    using Launch = void (*)(dim3, dim3, EmuArgs&);
    std::map<std::string, Launch> kernels = {ENTRIES(f32), ENTRIES(f64), ENTRIES(f16), ENTRIES(bf16)};
    if (argc < 6) {
        std::fprintf(stderr, "usage: %s KERNEL GRID_X BLOCK_X BLOCK_Y DIR ARG...\n", argv[0]);
        return 2;
    }
    auto kernel = kernels.find(argv[1]);
    if (kernel == kernels.end()) {
        std::fprintf(stderr, "no kernel named %s\n", argv[1]);
        return 2;
    }
    dim3 grid{(unsigned)std::stoul(argv[2]), 1, 1}, block{(unsigned)std::stoul(argv[3]), (unsigned)std::stoul(argv[4]), 1};
    std::string dir = argv[5];
    std::vector<std::vector<unsigned char>> buffers;
    EmuArgs args{std::vector<std::string>(argv + 6, argv + argc), &buffers};
    for (const auto& spec : args.specs) {
        if (spec.rfind("in:", 0) == 0 || spec.rfind("out:", 0) == 0) {
            size_t i = std::stoul(spec.substr(spec.find(':') + 1));
            if (buffers.size() <= i) buffers.resize(i + 1);
            std::ifstream f(dir + "/" + std::to_string(i) + ".bin", std::ios::binary);
            buffers[i].assign(std::istreambuf_iterator<char>(f), {});
        }
    }
    kernel->second(grid, block, args);
    if (args.at != args.specs.size()) {
        std::fprintf(stderr, "%zu arguments for %zu parameters\n", args.specs.size(), args.at);
        return 2;
    }
    for (const auto& spec : args.specs) {
        if (spec.rfind("out:", 0) == 0) {
            size_t i = std::stoul(spec.substr(4));
            std::ofstream f(dir + "/" + std::to_string(i) + ".bin", std::ios::binary);
            f.write((const char*)buffers[i].data(), (std::streamsize)buffers[i].size());
        }
    }
    return 0;
}
