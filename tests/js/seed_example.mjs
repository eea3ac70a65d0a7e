// The spec's JavaScript example ("Using the API" → JavaScript/TypeScript), unchanged but for
// the base URL and key, which come from the environment. Prints one JSON line for the test.
import OpenAI from 'openai';

const openai = new OpenAI({
    apiKey: process.env.ROUTSTR_API_KEY,
    baseURL: process.env.ROUTSTR_BASE_URL
});

async function main() {
    const completion = await openai.chat.completions.create({
        model: 'gpt-3.5-turbo',
        messages: [
            { role: 'system', content: 'You are a helpful assistant.' },
            { role: 'user', content: 'Hello!' }
        ]
    });

    console.log(completion.choices[0].message.content);

    const stream = await openai.chat.completions.create({
        model: 'gpt-3.5-turbo',
        messages: [{ role: 'user', content: 'Write a short story' }],
        stream: true
    });
    let text = '';
    for await (const chunk of stream) {
        text += chunk.choices[0]?.delta?.content ?? '';
    }
    console.log(text);

    try {
        await openai.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] });
    } catch (e) {
        console.log(JSON.stringify({ status: e.status, type: e.error?.type, code: e.error?.code }));
    }
}

main();
