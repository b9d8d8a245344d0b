// kvq: the in-process command-line tool.
//   kvq generate  --model M --prompt "..." [--chat] [--max_tokens N] [--temperature T --seed S]
//   kvq eval-ppl  --model M --text FILE [--context 2048 --stride 2048 --max_windows N --kv_format F]
//   kvq tokenize  --model M --text "..."
//   kvq logits    --model M --ids 1,2,3 [--top 5]     (debugging: last-position top logits)
// Subcommands registered in tools/kvq_*.cc add to this list (see kvq_commands.h).
#include <cstdio>
#include <string>

#include "absl/strings/str_join.h"
#include "tools/kvq_commands.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: kvq <command> [flags]\ncommands: %s\n",
                 absl::StrJoin(kvq::tools::CommandNames(), ", ").c_str());
    return 2;
  }
  return kvq::tools::RunCommand(argv[1], argc - 1, argv + 1);
}
