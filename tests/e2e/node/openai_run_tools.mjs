// One tool round trip with the official openai Node SDK's runTools helper: the model calls
// get_weather, the helper runs it, sends the result back and returns the final answer.
// Input: one JSON argument {baseURL, apiKey, model, prompt, stream}. Output: one JSON line.
import OpenAI from 'openai';

const cfg = JSON.parse(process.argv[2]);
const client = new OpenAI({ baseURL: cfg.baseURL, apiKey: cfg.apiKey, maxRetries: 0, timeout: 30_000 });
const calls = [];
const runner = client.chat.completions.runTools({
  model: cfg.model,
  stream: cfg.stream,
  messages: [{ role: 'user', content: cfg.prompt }],
  tools: [{
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'Current weather in a city.',
      parameters: {
        type: 'object',
        properties: { city: { type: 'string' } },
        required: ['city'],
        additionalProperties: false,
      },
      parse: JSON.parse,
      function: async ({ city }) => {
        calls.push(city);
        return `sunny, 21 C in ${city}`;
      },
    },
  }],
});
let streamed = '';
if (cfg.stream) runner.on('content', (delta) => { streamed += delta; });
const final = await runner.finalContent();
const completions = runner.allChatCompletions();
console.log(JSON.stringify({
  final,
  streamed,
  calls,
  finishReasons: completions.map((c) => c.choices[0].finish_reason),
  toolCallIds: completions.flatMap((c) => (c.choices[0].message.tool_calls || []).map((t) => t.id)),
  messages: runner.messages.map((m) => m.role),
}));
